"""The fp32 reference probe of `kt serve-bench`: greedy completions computed with Hugging Face
transformers from the model folder the engines serve, with the top-k log-probabilities of every
step.

    python hf_reference.py --model DIR --prompts PROMPTS.json --out PROBE.json [--device cuda]

Run by kt under an engine's Python (MAX's or vLLM's environment has torch and transformers), so
it imports nothing of kt, like max_arch/kt_max_llama.py. Each prompt is tokenized as the
engines' /v1/completions tokenize a text prompt (with the tokenizer's special tokens: kt's
tokenizer prepends BOS), then `--max-tokens` tokens are decoded greedily, EOS ignored, as kt's
probe asks the engines to (`ignore_eos`). The model runs in float32 (checkpoint weights upcast
exactly), eager attention, fp32 matmuls without TF32.

The record matches an engine's probe.json: `steps[p][t]` maps the text of each of the top-k
tokens of step t to its log-probability (log_softmax of the fp32 logits), likeliest first. A
token's text is the decoded text of that single token, special tokens skipped, and ids that
decode alike collapse to the last one listed (the least likely), as MAX and vLLM key completions
logprobs: byte tokens of partial UTF-8 characters all read '\ufffd', so a step's first key is
not always the greedy token. `greedy[p][t]` is that token's [text, logprob]; `texts[p]` the
whole completion decoded at once, special tokens skipped, as the servers' text;
`hidden[p][l]` the [max |h|, RMS] of decoder layer l's output at the prompt's last token in the
prefill (`prompt_tokens[p]` tokens), `hidden_attn[p][l]` the same of the residual stream after
the layer's attention, to set beside KT_CHECK=hidden's prints. Written
atomically. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def fail(msg: str) -> None:
    print(f"hf_reference: {msg}", file=sys.stderr)
    sys.exit(2)


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stats(h) -> list[float]:
    """[max |h|, RMS] of the last row of a [1, rows, hidden] tensor, in fp32."""
    h = h[0, -1].float()
    return [h.abs().max().item(), h.pow(2).mean().sqrt().item()]


def layer_outputs(model, record: list, record_attn: list):
    """Hooks on the decoder layers that append, once per layer and forward, the [max |h|, RMS]
    of the residual stream's last row after the layer (to `record`) and after its attention
    (the input of its post-attention norm, to `record_attn`): what kt's KT_CHECK=hidden prints
    of a served prefill. Returns the hooks' handles."""
    def after_layer(_module, _args, out):
        record.append(_stats(out[0] if isinstance(out, tuple) else out))

    def after_attention(_module, args):
        record_attn.append(_stats(args[0]))
    return ([layer.register_forward_hook(after_layer) for layer in model.model.layers]
            + [layer.post_attention_layernorm.register_forward_pre_hook(after_attention)
               for layer in model.model.layers])


def decode_greedy(model, tok, prompt: str, max_tokens: int, top_k: int, device: str):
    """(text, steps, greedy, hidden, hidden_attn) of one prompt: `max_tokens` greedy steps with a
    KV cache; hidden and hidden_attn: `layer_outputs` of the prompt's forward (the prefill)."""
    import torch

    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    chosen, steps, greedy, past, hidden, hidden_attn = [], [], [], None, [], []
    with torch.no_grad():
        for step in range(max_tokens):
            hooks = layer_outputs(model, hidden, hidden_attn) if step == 0 else []
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            for handle in hooks:
                handle.remove()
            past = out.past_key_values
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top = torch.topk(logprobs, top_k)  # sorted: the greedy token first
            texts = [tok.decode([i], skip_special_tokens=True) for i in top.indices.tolist()]
            step = dict(zip(texts, top.values.tolist()))  # alike texts: the last (least likely) stays
            steps.append(dict(sorted(step.items(), key=lambda kv: -kv[1])))
            greedy.append([texts[0], top.values[0].item()])
            chosen.append(top.indices[0].item())
            ids = top.indices[:1].view(1, 1)
    return tok.decode(chosen, skip_special_tokens=True), steps, greedy, hidden, hidden_attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="a JSON list of prompt strings")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        fail(f"--model {args.model}: no config.json there")
    try:
        prompts = json.loads(args.prompts.read_text())
    except (OSError, ValueError) as e:
        fail(f"--prompts {args.prompts}: {getattr(e, 'strerror', None) or e}")
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        fail(f"--prompts {args.prompts}: not a JSON list of strings")
    if args.max_tokens < 1 or args.top_k < 1:
        fail("--max-tokens and --top-k must be at least 1")
    try:
        import torch
        import transformers
    except ImportError as e:
        fail(f"{sys.executable} cannot import {e.name}: the reference needs torch and transformers")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch {torch.__version__} sees no GPU")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        fail(f"--device {args.device}: use cpu, cuda or cuda:N")
    torch.set_float32_matmul_precision("highest")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                                  attn_implementation="eager")
    except (OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {str(e).splitlines()[0]}")
    model = model.float().to(args.device).eval()
    texts, steps, greedy, hidden, hidden_attn = [], [], [], [], []
    for prompt in prompts:
        text, s, g, h, ha = decode_greedy(model, tok, prompt, args.max_tokens, args.top_k, args.device)
        texts.append(text)
        steps.append(s)
        greedy.append(g)
        hidden.append(h)
        hidden_attn.append(ha)
    write_json_atomic(args.out, {"prompts": prompts, "texts": texts, "steps": steps, "greedy": greedy,
                                 "hidden": hidden, "hidden_attn": hidden_attn,
                                 "prompt_tokens": [len(tok(p).input_ids) for p in prompts],
                                 "device": args.device, "dtype": "float32",
                                 "transformers": transformers.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
