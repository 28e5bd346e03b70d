"""Random-weight Llama model directories that every serving engine can load offline.

`make_model(preset, out, seed)` writes what a Hugging Face Llama checkpoint has: `config.json`,
`generation_config.json`, `model.safetensors`, and a tokenizer (`tokenizer.json`,
`tokenizer_config.json` with a Llama-3-style chat template). Nothing is downloaded:

* The tokenizer is a byte-level BPE trained here on kt's own text (`data/`). BPE on a small
  corpus learns fewer tokens than the model's vocabulary, so the vocabulary is filled with plain
  byte-level entries (`Ġkt12345`) that no merge produces but that decode to text: every id the
  model can sample decodes.
* Weights are drawn from a seeded `torch.Generator` (same seed and device, same bytes), on the GPU
  when there is one (an 8B model in seconds), and written as safetensors shards of at most 5 GB
  with an index, as Hugging Face does. The LM head is drawn
  with a larger std than a trained model's so that greedy decoding of this random model has clear
  winners and few near-ties (see `harness/serving/maxkt.py` for why that matters).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.io import write_json_atomic

DATA = Path(__file__).parent / "data"

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Llama geometry. `dtype` is what the weights are stored in."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    dtype: str
    tie_word_embeddings: bool = False


PRESETS: dict[str, Preset] = {
    # CPU CI scale: 2 layers, GQA 2:1, head_dim 64.
    "tiny": Preset(2048, 256, 512, 2, 4, 2, 2048, 500000.0, "float32"),
    # Geometry of meta-llama/Llama-3.2-1B (random weights).
    "llama-3.2-1b": Preset(128256, 2048, 8192, 16, 32, 8, 131072, 500000.0, "bfloat16", True),
    # Geometry of meta-llama/Llama-3.1-8B (random weights).
    "llama-3.1-8b": Preset(128256, 4096, 14336, 32, 32, 8, 131072, 500000.0, "bfloat16"),
}


def corpus() -> list[str]:
    """kt's shipped text: the sonnet set and the conversational set's contents."""
    lines = [ln for ln in (DATA / "sonnets.txt").read_text().splitlines() if ln.strip()]
    for row in (DATA / "conversations.jsonl").read_text().splitlines():
        lines += [m["content"] for m in json.loads(row)["messages"]]
    return lines


def build_tokenizer(vocab_size: int) -> dict:
    """A byte-level BPE tokenizer (tokenizer.json as a dict) with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    learn = min(vocab_size, 4096)
    trainer = trainers.BpeTrainer(
        vocab_size=learn,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab.setdefault(added["content"], added["id"])
    if len(vocab) > vocab_size:
        raise ValueError(f"tokenizer learned {len(vocab)} ids, more than vocab_size={vocab_size}")
    # Fill the rest of the vocabulary with decodable entries no merge produces.
    used = set(vocab.values())
    for i in range(vocab_size):
        if i not in used:
            vocab[f"Ġkt{i}"] = i
    return spec


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": "<|end_of_text|>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def hf_config(p: Preset, tok: dict) -> dict:
    vocab = tok["model"]["vocab"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.hidden_size // p.num_attention_heads,
        "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": p.rope_theta,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.dtype,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
    }


def weight_shapes(p: Preset) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every weight, in checkpoint order, named as in Hugging Face
    checkpoints. kind: 'embed' (std 1), 'head' (std 0.5), 'norm' (1 + 0.1 N(0,1)) or 'proj:<fan_in>'."""
    hd = p.hidden_size // p.num_attention_heads
    h, f = p.hidden_size, p.intermediate_size
    out = [("model.embed_tokens.weight", (p.vocab_size, h), "embed")]
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        out += [
            (pre + "input_layernorm.weight", (h,), "norm"),
            (pre + "post_attention_layernorm.weight", (h,), "norm"),
            (pre + "self_attn.q_proj.weight", (p.num_attention_heads * hd, h), f"proj:{h}"),
            (pre + "self_attn.k_proj.weight", (p.num_key_value_heads * hd, h), f"proj:{h}"),
            (pre + "self_attn.v_proj.weight", (p.num_key_value_heads * hd, h), f"proj:{h}"),
            (pre + "self_attn.o_proj.weight", (h, p.num_attention_heads * hd), f"proj:{h}"),
            (pre + "mlp.gate_proj.weight", (f, h), f"proj:{h}"),
            (pre + "mlp.up_proj.weight", (f, h), f"proj:{h}"),
            (pre + "mlp.down_proj.weight", (h, f), f"proj:{f}"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    if not p.tie_word_embeddings:
        # std 0.5 over unit-RMS inputs: logits of std ~0.5*sqrt(h), far apart.
        out.append(("lm_head.weight", (p.vocab_size, h), "head"))
    return out


def iter_weights(p: Preset, seed: int, device: str = "cpu"):
    """Seeded random Llama weights as (name, CPU tensor in p.dtype), one at a time, drawn from a
    torch.Generator on `device` ('cpu' or 'cuda'): the same seed and device give the same bytes."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p.dtype)
    for name, shape, kind in weight_shapes(p):
        x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        if kind == "norm":
            x = 1.0 + 0.1 * x
        else:
            std = {"embed": 1.0, "head": 0.5}.get(kind) or int(kind.split(":")[1]) ** -0.5
            x = x * std
        yield name, x.to(dtype).cpu()
        del x


def weights(p: Preset, seed: int, device: str = "cpu") -> dict:
    """All of `iter_weights` in one dict (small presets)."""
    return dict(iter_weights(p, seed, device))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU")
    return device


SHARD_BYTES = 5 * 1024**3  # as Hugging Face's save_pretrained: shards of at most ~5 GB


def save_sharded(p: Preset, seed: int, out: Path, device: str) -> list[str]:
    """Write the weights as model.safetensors, or as model-0000k-of-0000n.safetensors shards plus
    model.safetensors.index.json when they exceed SHARD_BYTES; return the weight file names.
    One shard at a time is held in memory."""
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    shard: dict = {}
    size = total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(written) + 1:05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})  # safetensors orders keys itself
        os.chmod(tmp, 0o644)  # safetensors writes 0600: the group reads results and models too
        written.append((tmp, list(shard)))
        shard.clear()

    for name, t in iter_weights(p, seed, device):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], out / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, (tmp, keys) in enumerate(written, 1):
        final = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, out / final)
        names.append(final)
        weight_map |= dict.fromkeys(keys, final)
    write_json_atomic(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def make_model(preset: str, out: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write a random-weight Llama model directory for `preset` into `out`; return `out`.
    `device` ('cpu', 'cuda' or 'auto') is where the weights are drawn: CUDA makes an 8B model
    in seconds, and the same seed gives other bytes there than on the CPU."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    device = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(p.vocab_size)
    cfg = hf_config(p, tok)
    write_json_atomic(out / "tokenizer.json", tok)
    write_json_atomic(out / "tokenizer_config.json", tokenizer_config(p.max_position_embeddings))
    write_json_atomic(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})
    write_json_atomic(out / "config.json", cfg)
    write_json_atomic(
        out / "generation_config.json",
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False},
    )
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    files = save_sharded(p, seed, out, device)
    write_json_atomic(out / "kt_model.json", {"preset": preset, "seed": seed, "generator_device": device,
                                       "weight_files": files, **asdict(p)})
    return out
