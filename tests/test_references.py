"""The references against independent formulations, and the spec contracts they rest on.

RoPE against complex multiplication and HF's `rotate_half`; the Llama 3 frequencies against
a scalar transcription of HF's `_compute_llama3_parameters`; RMSNorm against
`torch.nn.functional.rms_norm`; attention against `scaled_dot_product_attention` with the
mask and the GQA head map spelled out. Then: what each golden case claims to guard against
is shown by planting that bug in a copy of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pykernels
from harness.spec import DTYPES
from pykernels import fused_rope_attention as fra
from pykernels import rope

CPU = torch.device("cpu")
LLAMA3 = {"theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position": 8192.0}


def _inputs(spec, free, params, dtype=torch.float64, seed=0):
    shape = spec.complete(free)
    params = spec.full_params(params)
    gen = torch.Generator().manual_seed(seed)
    return shape, params, spec.make_inputs(shape, params, dtype, CPU, gen)


def _llama3_scalar(i: int, dim: int, theta, factor, low, high, orig) -> float:
    inv = 1.0 / theta ** (2 * i / dim)
    wavelen = 2 * math.pi / inv
    if wavelen < orig / high:
        return inv
    if wavelen > orig / low:
        return inv / factor
    smooth = (orig / wavelen - low) / (high - low)
    return (1 - smooth) * inv / factor + smooth * inv


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, params) -> torch.Tensor:
    """Half-rotation RoPE as complex multiplication: (x1 + i x2) e^(i pos inv_freq)."""
    d = x.shape[-1]
    inv = torch.tensor([_llama3_scalar(i, d, *rope.freq_params(params)) for i in range(d // 2)],
                       dtype=torch.float64)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    angle = positions.double()[..., None] * inv
    z = z * torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


# --- Llama 3 frequencies ---------------------------------------------------------------------

def test_llama3_inv_freq_matches_hand_computation():
    inv = rope.llama3_inv_freq(128, *LLAMA3.values(), dtype=torch.float64)
    want = [_llama3_scalar(i, 128, *LLAMA3.values()) for i in range(64)]
    torch.testing.assert_close(inv, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    plain = 500000.0 ** (-torch.arange(64, dtype=torch.float64) / 64)
    # Llama 3.1 8B: pairs 0-28 keep their frequency (wavelength < 2048), 35-63 are divided by 8
    # (wavelength > 8192), and 29-34 slide from nearly 1 down towards 1/8 of it.
    torch.testing.assert_close(inv[:29], plain[:29], rtol=1e-15, atol=0)
    torch.testing.assert_close(inv[35:], plain[35:] / 8, rtol=1e-15, atol=0)
    mid = inv[29:35] / plain[29:35]
    assert bool(((mid > 1 / 8) & (mid < 1)).all()) and bool((mid.diff() < 0).all())
    assert inv[0].item() == 1.0


def test_llama3_bands_are_continuous():
    """Just inside and just outside either band edge the scaled frequency is the same."""
    orig, low, high, factor = 8192.0, 1.0, 4.0, 8.0
    for edge in (orig / low, orig / high):
        ratios = []
        for nudge in (1 - 1e-9, 1 + 1e-9):
            theta = (edge * nudge / (2 * math.pi)) ** 2  # pair 1 of D = 4 has inv = theta^-1/2
            inv = rope.llama3_inv_freq(4, theta, factor, low, high, orig, dtype=torch.float64)
            ratios.append(inv[1].item() * math.sqrt(theta))
        assert ratios[0] == pytest.approx(ratios[1], rel=1e-6)
        assert ratios[0] == pytest.approx(1 / factor if edge == orig / low else 1.0, rel=1e-6)


@pytest.mark.parametrize("dim", [2, 6, 64, 80, 128, 256])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_factor_one_is_plain_rope_and_fp32_is_hf(dim, theta):
    """factor = 1 is plain RoPE, and in fp32 it is bit-identical to HF's default inv_freq."""
    params = dict(LLAMA3, theta=theta, factor=1.0)
    hf = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    ours = rope.llama3_inv_freq(dim, *rope.freq_params(params))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf, rtol=2e-7, atol=0)
    wide = rope.llama3_inv_freq(dim, *rope.freq_params(params), dtype=torch.float64)
    torch.testing.assert_close(wide, theta ** (-torch.arange(0, dim, 2).double() / dim),
                               rtol=1e-14, atol=0)


# --- RoPE ------------------------------------------------------------------------------------

ROPE_SHAPES = [
    {"B": 1, "S": 1, "Hk": 1, "group": 1, "D": 2},
    {"B": 2, "S": 7, "Hk": 2, "group": 3, "D": 80},
    {"B": 3, "S": 33, "Hk": 1, "group": 4, "D": 128},
    {"B": 1, "S": 5, "Hk": 2, "group": 1, "D": 256},
]


@pytest.mark.parametrize("free", ROPE_SHAPES, ids=lambda f: "x".join(map(str, f.values())))
@pytest.mark.parametrize("positions", ["arange", "random", "long"])
@pytest.mark.parametrize("factor", [1.0, 8.0])
def test_rope_matches_complex_rotation(free, positions, factor):
    spec = pykernels.get("rope")
    _, params, inp = _inputs(spec, free, {"positions": positions, "factor": factor})
    q_out, k_out = spec.reference(inp, params)
    torch.testing.assert_close(q_out, _rope_complex(inp["q"], inp["positions"], params),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k_out, _rope_complex(inp["k"], inp["positions"], params),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rope_in_low_precision_is_hf_bit_for_bit(dtype):
    """In a 16-bit dtype the reference is exactly HF's `apply_rotary_pos_emb`: fp32 cos/sin
    cast to the activations' dtype, then q * cos + rotate_half(q) * sin in that dtype."""
    spec = pykernels.get("rope")
    free = {"B": 2, "S": 40, "Hk": 2, "group": 2, "D": 96}
    _, params, inp = _inputs(spec, free, dict(LLAMA3, positions="random"), DTYPES[dtype])
    inv = rope.llama3_inv_freq(96, *rope.freq_params(params))
    freqs = inp["positions"].float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    cos, sin = emb.cos().to(DTYPES[dtype]), emb.sin().to(DTYPES[dtype])

    def rotate_half(x):
        x1, x2 = x[..., :48], x[..., 48:]
        return torch.cat((-x2, x1), dim=-1)

    q_out, k_out = spec.reference(inp, params)
    assert q_out.dtype == DTYPES[dtype]
    assert torch.equal(q_out, inp["q"] * cos + rotate_half(inp["q"]) * sin)
    assert torch.equal(k_out, inp["k"] * cos + rotate_half(inp["k"]) * sin)


def test_rope_fp32_angles_lose_precision_at_long_positions():
    """The fp64 reference really computes its angles in fp64: at positions up to 128k the fp32
    reference is off by ~1e-2 (fp32 angle rounding), the fp64 one by ~1e-10."""
    spec = pykernels.get("rope")
    free = {"B": 2, "S": 64, "Hk": 1, "group": 1, "D": 128}
    _, params, inp = _inputs(spec, free, dict(LLAMA3, positions="long"))
    exact = _rope_complex(inp["q"], inp["positions"], params)
    (q64, _), (q32, _) = spec.reference(inp, params), spec.reference(
        {k: v.float() if v.is_floating_point() else v for k, v in inp.items()}, params)
    assert (q64 - exact).abs().max() < 1e-9
    assert (q32.double() - exact).abs().max() > 1e-3


# --- RMSNorm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n", [(1, 1), (3, 129), (16, 4096), (5, 127)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("input_scale", [1.0, 0.01])
def test_rms_norm_matches_torch(m, n, eps, input_scale):
    spec = pykernels.get("rms_norm")
    _, params, inp = _inputs(spec, {"M": m, "N": n}, {"eps": eps, "input_scale": input_scale})
    (y,) = spec.reference(inp, params)
    eps32 = torch.tensor(eps, dtype=torch.float32).item()
    torch.testing.assert_close(y, F.rms_norm(inp["x"], (n,), inp["w"], eps32), rtol=1e-12,
                               atol=1e-12)


def test_rms_norm_zero_rows_give_zero():
    spec = pykernels.get("rms_norm")
    _, params, inp = _inputs(spec, {"M": 4, "N": 64}, {"input_scale": 0.0}, torch.float16)
    (y,) = spec.reference(inp, params)
    assert torch.equal(y, torch.zeros_like(y))


# --- attention -------------------------------------------------------------------------------

def _attention_sdpa(inp, params):
    """RoPE by complex rotation, kv head h // group, an explicit bottom-right boolean mask."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    b, sq, hq, d = q.shape
    skv, hk = k.shape[1], k.shape[2]
    qpos = torch.arange(skv - sq, skv)
    kpos = torch.arange(skv)
    q = _rope_complex(q, qpos.expand(b, sq), params)
    k = _rope_complex(k, kpos.expand(b, skv), params)
    heads = torch.arange(hq) // (hq // hk)
    k, v = k[:, :, heads], v[:, :, heads]
    mask = kpos[None, :] <= qpos[:, None] if params["causal"] else None
    scale = None
    if params["scale"] > 0:
        scale = torch.tensor(params["scale"], dtype=torch.float32).item()
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


ATTN_SHAPES = [
    {"B": 1, "Sq": 1, "cache": 0, "Hk": 1, "group": 1, "D": 16},
    {"B": 2, "Sq": 1, "cache": 37, "Hk": 2, "group": 4, "D": 64},
    {"B": 1, "Sq": 17, "cache": 111, "Hk": 1, "group": 3, "D": 80},
    {"B": 2, "Sq": 33, "cache": 0, "Hk": 2, "group": 2, "D": 96},
    {"B": 1, "Sq": 9, "cache": 4, "Hk": 1, "group": 8, "D": 256},
]


@pytest.mark.parametrize("free", ATTN_SHAPES, ids=lambda f: "x".join(map(str, f.values())))
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("scale", [0.0, 0.3])
@pytest.mark.parametrize("logits", ["unit", "huge"])
def test_attention_matches_sdpa(free, causal, scale, logits):
    spec = pykernels.get("fused_rope_attention")
    params = dict(LLAMA3, causal=causal, scale=scale, logits=logits)
    _, params, inp = _inputs(spec, free, params)
    (o,) = spec.reference(inp, params)
    torch.testing.assert_close(o, _attention_sdpa(inp, params), rtol=1e-9, atol=1e-9)


def test_square_causal_is_sdpa_is_causal_and_decode_sees_everything():
    spec = pykernels.get("fused_rope_attention")
    _, params, inp = _inputs(spec, {"B": 1, "Sq": 20, "cache": 0, "Hk": 1, "group": 1, "D": 32},
                             {"causal": 1})
    (o,) = spec.reference(inp, params)
    q = _rope_complex(inp["q"], torch.arange(20).expand(1, 20), params)
    k = _rope_complex(inp["k"], torch.arange(20).expand(1, 20), params)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          inp["v"].transpose(1, 2), is_causal=True)
    torch.testing.assert_close(o, want.transpose(1, 2), rtol=1e-10, atol=1e-10)
    _, params, inp = _inputs(spec, {"B": 2, "Sq": 1, "cache": 50, "Hk": 2, "group": 2, "D": 64},
                             {"causal": 1})
    (causal,) = spec.reference(inp, params)
    (full,) = spec.reference(inp, dict(params, causal=0))
    assert torch.equal(causal, full)


def test_huge_logits_overflow_naive_softmax_but_stay_spread():
    spec = pykernels.get("fused_rope_attention")
    free = {"B": 1, "Sq": 8, "cache": 40, "Hk": 1, "group": 1, "D": 64}
    for scale in (0.0, 0.3):
        _, params, inp = _inputs(spec, free, {"logits": "huge", "scale": scale}, torch.float32)
        d = 64
        q = rope.apply_rope(inp["q"], *rope.rope_cos_sin(torch.arange(40, 48).expand(1, 8), d,
                                                          params, torch.float32))
        k = rope.apply_rope(inp["k"], *rope.rope_cos_sin(torch.arange(48).expand(1, 48), d,
                                                          params, torch.float32))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * fra.softmax_scale(params, d)
        assert logits.min() > 120
        assert torch.isinf(logits.exp()).all()
        assert logits.softmax(-1).max() < 0.9


def test_masked_pairs_counts_the_mask():
    for sq, cache in [(1, 0), (1, 9), (7, 0), (5, 11), (129, 128)]:
        shape = {"Sq": sq, "cache": cache}
        qpos = torch.arange(cache, cache + sq)
        visible = (torch.arange(sq + cache)[None, :] <= qpos[:, None]).sum().item()
        assert fra.masked_pairs(shape, True) == visible
        assert fra.masked_pairs(shape, False) == sq * (sq + cache)


# --- spec contracts --------------------------------------------------------------------------

SPECS = sorted(pykernels.discover())
KERNEL_ARGS = {
    "rope": ["theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position"],
    "rms_norm": ["eps"],
    "fused_rope_attention": ["scale", "causal", "theta", "factor", "low_freq_factor",
                             "high_freq_factor", "original_max_position"],
}


@pytest.mark.parametrize("name", SPECS)
def test_kernel_params_in_op_order(name):
    """The Mojo ops take their scalars in exactly this order."""
    assert [p.name for p in pykernels.get(name).kernel_params()] == KERNEL_ARGS[name]


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_golden_cases_are_valid_and_bytes_count_every_tensor_once(name, dtype):
    spec = pykernels.get(name)
    for case in spec.golden:
        assert spec.validate(case.shape, case.params) is None, case.why
        params = spec.full_params(case.params)
        assert set(params) == {p.name for p in spec.params}
        inp = spec.make_inputs(case.shape, params, DTYPES[dtype], CPU,
                               torch.Generator().manual_seed(0))
        for arg in spec.inputs:
            assert tuple(inp[arg.name].shape) == arg.concrete_shape(case.shape)
            assert inp[arg.name].dtype == arg.torch_dtype(DTYPES[dtype])
        out = spec.reference(inp, params)
        for arg, o in zip(spec.outputs, out, strict=True):
            assert tuple(o.shape) == arg.concrete_shape(case.shape)
            assert o.dtype == DTYPES[dtype]
        moved = sum(t.numel() * t.element_size() for t in list(inp.values()) + list(out))
        assert spec.bytes(case.shape, params, DTYPES[dtype]) == moved
        assert spec.flops(case.shape, params) > 0


@pytest.mark.parametrize("name", SPECS)
def test_same_precision_baseline_is_not_fp32_in_disguise(name):
    """Run on bf16 the reference keeps bf16 intermediates: it differs from the fp32 reference
    rounded once to bf16 (a silent upcast would make the two agree)."""
    spec = pykernels.get(name)
    case = max(spec.golden, key=lambda c: spec.numel(c.shape))
    params = spec.full_params(case.params)
    inp = spec.make_inputs(case.shape, params, torch.bfloat16, CPU,
                           torch.Generator().manual_seed(0))
    low = spec.reference(inp, params)
    once = spec.reference({k: v.float() if v.is_floating_point() else v
                           for k, v in inp.items()}, params)
    assert any(not torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(low, once))


# --- the golden cases catch what they say they catch ------------------------------------------

def _fails_rule(spec, case, dtype, buggy) -> bool:
    """Would `buggy(inputs, params)` fail the k x baseline rule (or be non-finite)?"""
    params = spec.full_params(case.params)
    inp = spec.make_inputs(case.shape, params, dtype, CPU, torch.Generator().manual_seed(0))
    wide = {k: v.double() if v.is_floating_point() else v for k, v in inp.items()}
    truth = spec.reference(wide, params)
    base = spec.reference(inp, params)
    got = buggy(inp, params)
    for t, b, g in zip(truth, base, got):
        if not torch.isfinite(g).all():
            return True
        bound = spec.tolerance_k * (b.double() - t).abs().max() + \
            torch.finfo(dtype).eps * t.abs().max()
        if (g.double() - t).abs().max() > bound:
            return True
    return False


def _golden(spec, fragment):
    (case,) = [c for c in spec.golden if fragment in c.why]
    return case


def test_golden_catches_top_left_causal_mask():
    spec = pykernels.get("fused_rope_attention")

    def top_left(inp, params):
        q, k, v = inp["q"], inp["k"], inp["v"]
        sq, skv = q.shape[1], k.shape[1]
        # rope and GQA right, mask aligned to the top-left corner: query i sees keys j <= i.
        pos_q = torch.arange(skv - sq, skv).expand(q.shape[0], sq)
        pos_k = torch.arange(skv).expand(k.shape[0], skv)
        q = rope.apply_rope(q, *rope.rope_cos_sin(pos_q, q.shape[-1], params, q.dtype))
        k = rope.apply_rope(k, *rope.rope_cos_sin(pos_k, k.shape[-1], params, k.dtype))
        g = q.shape[2] // k.shape[2]
        s = torch.einsum("bqhd,bkhd->bhqk", q * fra.softmax_scale(params, q.shape[-1]),
                         k.repeat_interleave(g, 2))
        s = s.masked_fill(torch.arange(skv)[None, :] > torch.arange(sq)[:, None], float("-inf"))
        return (torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(g, 2)),)

    assert _fails_rule(spec, _golden(spec, "bottom-right"), torch.bfloat16, top_left)


def test_golden_catches_softmax_without_max_subtraction():
    spec = pykernels.get("fused_rope_attention")

    def naive(inp, params):
        (o,) = spec.reference(inp, params)
        q, k = inp["q"], inp["k"]
        sq, skv = q.shape[1], k.shape[1]
        pos_q = torch.arange(skv - sq, skv).expand(q.shape[0], sq)
        pos_k = torch.arange(skv).expand(k.shape[0], skv)
        q = rope.apply_rope(q, *rope.rope_cos_sin(pos_q, q.shape[-1], params, q.dtype))
        k = rope.apply_rope(k, *rope.rope_cos_sin(pos_k, k.shape[-1], params, k.dtype))
        g = q.shape[2] // k.shape[2]
        e = torch.einsum("bqhd,bkhd->bhqk", q * fra.softmax_scale(params, q.shape[-1]),
                         k.repeat_interleave(g, 2)).float().exp()
        p = e / e.sum(-1, keepdim=True)
        return (torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), inp["v"].repeat_interleave(g, 2)),)

    for fragment in ("exp overflows fp32", "decode with logits"):
        for dtype in (torch.float32, torch.bfloat16):
            assert _fails_rule(spec, _golden(spec, fragment), dtype, naive)


def test_golden_catches_interleaved_rope():
    spec = pykernels.get("rope")

    def interleaved(inp, params):
        out = []
        for x in (inp["q"], inp["k"]):
            cos, sin = rope.rope_cos_sin(inp["positions"], x.shape[-1], params, x.dtype)
            x1, x2 = x[..., 0::2], x[..., 1::2]
            c, s = cos[:, :, None, :], sin[:, :, None, :]
            out.append(torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2))
        return tuple(out)

    for case in spec.golden:
        if case.shape["D"] > 2 and (case.params["positions"] != "arange" or case.shape["S"] > 1):
            assert _fails_rule(spec, case, torch.bfloat16, interleaved), case.why


def test_golden_catches_eps_outside_the_square_root_and_missing_eps():
    spec = pykernels.get("rms_norm")

    def eps_outside(inp, params):
        x, w = inp["x"].float(), inp["w"].float()
        rms = x.square().mean(-1, keepdim=True).sqrt() + params["eps"]
        return ((x / rms * w).to(inp["x"].dtype),)

    def no_eps(inp, params):
        x, w = inp["x"].float(), inp["w"].float()
        return ((x * torch.rsqrt(x.square().mean(-1, keepdim=True)) * w).to(inp["x"].dtype),)

    assert _fails_rule(spec, _golden(spec, "eps outside"), torch.float32, eps_outside)
    assert _fails_rule(spec, _golden(spec, "all-zero rows"), torch.bfloat16, no_eps)
