"""Helpers shared by several kernel specs: fp32 scalars, Triton tile sizes, bf16 rounding
under Triton's interpreter, the RoPE frequency math of `rope` and `fused_rope_attention`, and
the copy yardstick of the memory-bound ops.

RoPE (Su et al. 2021) in the GPT-NeoX / HF Llama half-rotation layout with Llama 3 frequency
scaling (HF transformers `_compute_llama3_parameters`); `pykernels/rope.py` states the math.
Frequencies and angles are fp32 (fp64 for fp64 inputs), as in HF `LlamaRotaryEmbedding`.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from harness.spec import Bound, Param, Params, Tensors

FREQ_PARAMS = ("theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position")


def f32(x: float) -> float:
    """x as the kernel sees it: rounded to a float32 scalar."""
    return torch.tensor(x, dtype=torch.float32).item()


def block_elems() -> int:
    """Elements per Triton program: a GPU tile, or a large one under TRITON_INTERPRET=1,
    where every program instance costs Python overhead."""
    return 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1 << 12


def bf16_rne(dtype: torch.dtype) -> bool:
    """Whether a Triton twin must round to bf16 itself before casting: the interpreter
    (Triton 3.9) truncates fp32 -> bf16 casts instead of rounding to nearest even. The twins
    then round in fp32 with Veltkamp's split, x*K - (x*K - x), K = 2^16 + 1, which leaves
    bf16's 8 significant bits rounded to nearest, so the cast that follows is exact."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """`x` as a Triton twin must pass it: under the interpreter a bf16 tensor goes as its
    int16 bit patterns, which the twin widens to fp32 itself (bits << 16) and, for subnormal
    outputs, rounds to (fp32 bits rounded to nearest even at bit 16), because the
    interpreter's bf16 <-> fp32 conversions change subnormals (Triton 3.9: 1.19e-39 loads as
    7.3e-39). Elsewhere `x` itself."""
    return x.view(torch.int16) if bf16_rne(x.dtype) else x


def freq_params(params: Params) -> tuple[float, ...]:
    """The five frequency params, fp32-rounded, in kernel-argument order."""
    return tuple(f32(params[name]) for name in FREQ_PARAMS)


def freq_param_decls() -> tuple[Param, ...]:
    """The frequency params of a RoPE op: two bases (Llama 2, Llama 3), scaling off and on."""
    return (
        Param("theta", (10000.0, 500000.0), doc="RoPE base"),
        Param("factor", (1.0, 8.0), doc="Llama 3 scaling factor; 1 = plain RoPE"),
        Param("low_freq_factor", (1.0,), doc="Llama 3 low_freq_factor"),
        Param("high_freq_factor", (4.0,), doc="Llama 3 high_freq_factor"),
        Param("original_max_position", (8192.0,), doc="Llama 3 original_max_position_embeddings"),
    )


def angle_dtype(dtype: torch.dtype) -> torch.dtype:
    """Angles are fp32 for every kernel dtype, fp64 only when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def llama3_inv_freq(dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: float,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """inv_freq (dim/2,) with Llama 3 scaling, in `dtype` (HF `_compute_llama3_parameters`)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype) / dim
    inv = 1.0 / theta ** exponent
    wavelen = 2 * math.pi / inv
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_position / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, dim: int, params: Params,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (*positions.shape, dim/2) of pos * inv_freq, computed in angle_dtype(dtype)
    and then cast to `dtype` (as HF casts them to the activations' dtype)."""
    adt = angle_dtype(dtype)
    inv = llama3_inv_freq(dim, *freq_params(params), dtype=adt, device=positions.device)
    angle = positions.to(adt)[..., None] * inv
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-rotation of x (B, S, H, D) by cos/sin (B, S, D/2), in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def triton_inv_freq(dim: int, params: Params, device) -> torch.Tensor:
    """The fp32 inv_freq table the Triton twins read: `llama3_inv_freq` itself, so their
    angles are bit-identical to the fp32 reference's. (Recomputed in a kernel, even correctly
    rounded, theta^(-2i/D) differs from torch's fp32 pow by an ulp in about a quarter of the
    pairs; times a position near 1e5 that is an angle error the fp16 baseline lacks when both
    take their angles from torch.) Cached: building it is a dozen tiny launches, ~100 us on
    a GPU."""
    return _inv_freq_table(dim, freq_params(params), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _inv_freq_table(dim: int, freqs: tuple[float, ...], device: str) -> torch.Tensor:
    return llama3_inv_freq(dim, *freqs, device=device).contiguous()


def copy_yardstick(*names: str):
    """The yardstick `copy_alone` of a memory-bound op: the inputs `names` copied (torch
    `copy_`) into outputs allocated once per case, so the timed call moves the op's own bytes
    (its row's GB/s and % of peak use the op's byte count) at a plain device copy's rate: the
    ceiling a "% of HBM" target is read against. Not the op, so not checked."""

    def prepare(device: str, dtype: torch.dtype):
        def bind(inputs: Tensors, params: Params) -> Bound:
            src = [inputs[n] for n in names]
            dst = [torch.empty_like(t) for t in src]

            def run():
                for d, s in zip(dst, src):
                    d.copy_(s)
                return tuple(dst)

            return Bound(run, yardstick=f"a device copy of {', '.join(names)}")

        return bind

    return prepare
