"""`--custom-kernel-path` for MAX Serve, which has no such flag in 26.7.

MAX 26.7 has two mechanisms that can carry outside kernels; kt uses both through one door.

* **A custom architecture (the door).** `max serve --custom-architectures DIR:kt_max_llama`
  imports `max_arch/kt_max_llama.py` inside MAX's own model worker. It re-registers
  `LlamaForCausalLM` with a pipeline model that builds MAX's stock Llama 3 graph, then swaps
  each `RMSNorm` layer for one that calls `ops.custom("kt.rms_norm", ...)` and each decoder
  layer's attention for one whose RoPE, KV store and attention are kt's: after MAX's QKV
  projection, `kt.paged_rope_store` rotates the new keys as it writes them (with the values)
  into MAX's paged KV cache, in place, and `kt.paged_rope_attention` rotates the unrotated
  queries as it loads them and attends over the cache through MAX's block table (prefill and
  decode alike). The Mojo package is attached to the decoder graph through
  `GraphSpec.custom_extensions` (path via $KT_CUSTOM_KERNEL_PATH). RMSNorm needs this door:
  MAX's `ops.rms_norm` is a builtin graph op (`mo.ReduceRmsNormOp`), not a kernel looked up by
  name, so nothing can replace it from outside. Attention needs it too, for another reason:
  fusing RoPE into the attention kernel needs the unrotated queries and the RoPE parameters,
  and MAX's named kernels do not receive them (`mo.rope_split_store.ragged.paged` gets a cos/sin
  table and writes rotated queries; `mo.mha.ragged.paged` gets those rotated queries).
* **Overriding MAX's named kernels (works, by the same attachment).** MAX calls its attention
  and RoPE kernels by name (`ops.inplace_custom("mo.rope_split_store.ragged.paged")`,
  `"mo.mha.ragged.paged"`). A custom extension that registers a kernel under such a name
  replaces MAX's kernel in that graph: tests/serving/test_serve_max_override.py shows it with
  `mo.reduce.row_mean_of_squares` (MAX's kernel gives each row's mean of squares, the
  extension's gives 7s). It must match MAX's internal signature (paged KV-cache collections
  and all) and semantics (rotated queries in, a cos/sin table), which is why kt calls its
  paged ops from the architecture instead.

Evidence that the kernels are in the path and correct: `kt serve-bench` probes each engine with
greedy completions and top-k logprobs and compares max+kt with max (`agreement.py`); planted
broken `kt.rms_norm`, `kt.paged_rope_store` and `kt.paged_rope_attention` (tests/serving/
broken_*, each laid over a copy of kt's package) each make that comparison fail.
"""

from __future__ import annotations

from pathlib import Path

ARCH_DIR = Path(__file__).parent / "max_arch"
ARCH_MODULE = "kt_max_llama"


def custom_architecture_spec() -> str:
    return f"{ARCH_DIR}:{ARCH_MODULE}"


def check_kernel_path(path: Path) -> Path:
    """A Mojo package directory (with __init__.mojo) or a .mojopkg file."""
    path = Path(path).resolve()
    if path.is_dir() and (path / "__init__.mojo").exists():
        return path
    if path.is_file() and path.suffix == ".mojopkg":
        return path
    raise FileNotFoundError(f"--custom-kernel-path {path}: not a Mojo package (a directory with __init__.mojo, or a .mojopkg)")
