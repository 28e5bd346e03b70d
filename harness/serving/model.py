"""Random-weight Llama model directories that every serving engine can load offline.

`make_model(preset, out, seed)` writes what a Hugging Face Llama checkpoint has: `config.json`,
`generation_config.json`, `model.safetensors`, and a tokenizer (`tokenizer.json`,
`tokenizer_config.json` with a Llama-3-style chat template). Nothing is downloaded:

* The tokenizer is a byte-level BPE trained here on kt's own text (`data/`). BPE on a small
  corpus learns fewer tokens than the model's vocabulary, so the vocabulary is filled with plain
  byte-level entries (`Ġkt12345`) that no merge produces but that decode to text: every id the
  model can sample decodes.
* Weights are drawn from a seeded `torch.Generator` (same seed, same bytes). The LM head is drawn
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


def weights(p: Preset, seed: int) -> dict:
    """Seeded random Llama weights, named as in Hugging Face checkpoints."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p.dtype)
    hd = p.hidden_size // p.num_attention_heads

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    h, f = p.hidden_size, p.intermediate_size
    w = {"model.embed_tokens.weight": normal(p.vocab_size, h, std=1.0)}
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        w[pre + "input_layernorm.weight"] = ones(h)
        w[pre + "post_attention_layernorm.weight"] = ones(h)
        w[pre + "self_attn.q_proj.weight"] = normal(p.num_attention_heads * hd, h, std=h**-0.5)
        w[pre + "self_attn.k_proj.weight"] = normal(p.num_key_value_heads * hd, h, std=h**-0.5)
        w[pre + "self_attn.v_proj.weight"] = normal(p.num_key_value_heads * hd, h, std=h**-0.5)
        w[pre + "self_attn.o_proj.weight"] = normal(h, p.num_attention_heads * hd, std=h**-0.5)
        w[pre + "mlp.gate_proj.weight"] = normal(f, h, std=h**-0.5)
        w[pre + "mlp.up_proj.weight"] = normal(f, h, std=h**-0.5)
        w[pre + "mlp.down_proj.weight"] = normal(h, f, std=f**-0.5)
    w["model.norm.weight"] = ones(h)
    if not p.tie_word_embeddings:
        # std 0.5 over unit-RMS inputs: logits of std ~0.5*sqrt(h), far apart.
        w["lm_head.weight"] = normal(p.vocab_size, h, std=0.5)
    return w


def make_model(preset: str, out: Path, seed: int = 0) -> Path:
    """Write a random-weight Llama model directory for `preset` into `out`; return `out`."""
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
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
    tmp = out / ".model.safetensors.tmp"
    save_file(weights(p, seed), str(tmp), metadata={"format": "pt"})  # one key: safetensors orders keys by hash
    os.replace(tmp, out / "model.safetensors")
    write_json_atomic(out / "kt_model.json", {"preset": preset, "seed": seed, **asdict(p)})
    return out
