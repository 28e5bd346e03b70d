"""RoPE: the reference against independent formulations (complex multiplication, HF's
`rotate_half`, a scalar transcription of HF's Llama 3 frequencies), the golden cases against
the bug they guard against, the Mojo op's scalar order, planted Mojo bugs, the Triton twin on
extra cases and the benchmark families."""

from __future__ import annotations

import math

import pytest
import torch

import pykernels
import twins
from harness.bench.families import load_families
from harness.bench.summary import target_lines
from harness.spec import DTYPES, Case
from kernel_helpers import LLAMA3, fails_rule, inputs_for, llama3_scalar, rope_complex
from plants import Plant, assert_caught
from pykernels._common import freq_params, llama3_inv_freq, rope_cos_sin

SPEC = pykernels.get("rope")


def test_kernel_params_in_op_order():
    """The Mojo op takes its scalars in exactly this order."""
    assert [p.name for p in SPEC.kernel_params()] == [
        "theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position"]


# --- Llama 3 frequencies ---------------------------------------------------------------------

def test_llama3_inv_freq_matches_hand_computation():
    inv = llama3_inv_freq(128, *LLAMA3.values(), dtype=torch.float64)
    want = [llama3_scalar(i, 128, *LLAMA3.values()) for i in range(64)]
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
            inv = llama3_inv_freq(4, theta, factor, low, high, orig, dtype=torch.float64)
            ratios.append(inv[1].item() * math.sqrt(theta))
        assert ratios[0] == pytest.approx(ratios[1], rel=1e-6)
        assert ratios[0] == pytest.approx(1 / factor if edge == orig / low else 1.0, rel=1e-6)


@pytest.mark.parametrize("dim", [2, 6, 64, 80, 128, 256])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_factor_one_is_plain_rope_and_fp32_is_hf(dim, theta):
    """factor = 1 is plain RoPE, and in fp32 it is bit-identical to HF's default inv_freq."""
    params = dict(LLAMA3, theta=theta, factor=1.0)
    hf = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    ours = llama3_inv_freq(dim, *freq_params(params))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf, rtol=2e-7, atol=0)
    wide = llama3_inv_freq(dim, *freq_params(params), dtype=torch.float64)
    torch.testing.assert_close(wide, theta ** (-torch.arange(0, dim, 2).double() / dim),
                               rtol=1e-14, atol=0)


# --- the reference ---------------------------------------------------------------------------

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
    _, params, inp = inputs_for(spec, free, {"positions": positions, "factor": factor})
    q_out, k_out = spec.reference(inp, params)
    torch.testing.assert_close(q_out, rope_complex(inp["q"], inp["positions"], params),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k_out, rope_complex(inp["k"], inp["positions"], params),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rope_in_low_precision_is_hf_bit_for_bit(dtype):
    """In a 16-bit dtype the reference is exactly HF's `apply_rotary_pos_emb`: fp32 cos/sin
    cast to the activations' dtype, then q * cos + rotate_half(q) * sin in that dtype."""
    spec = pykernels.get("rope")
    free = {"B": 2, "S": 40, "Hk": 2, "group": 2, "D": 96}
    _, params, inp = inputs_for(spec, free, dict(LLAMA3, positions="random"), DTYPES[dtype])
    inv = llama3_inv_freq(96, *freq_params(params))
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
    _, params, inp = inputs_for(spec, free, dict(LLAMA3, positions="long"))
    exact = rope_complex(inp["q"], inp["positions"], params)
    (q64, _), (q32, _) = spec.reference(inp, params), spec.reference(
        {k: v.float() if v.is_floating_point() else v for k, v in inp.items()}, params)
    assert (q64 - exact).abs().max() < 1e-9
    assert (q32.double() - exact).abs().max() > 1e-3


# --- golden cases, planted bugs -------------------------------------------------------------

def test_golden_catches_interleaved_rope():
    spec = pykernels.get("rope")

    def interleaved(inp, params):
        out = []
        for x in (inp["q"], inp["k"]):
            cos, sin = rope_cos_sin(inp["positions"], x.shape[-1], params, x.dtype)
            x1, x2 = x[..., 0::2], x[..., 1::2]
            c, s = cos[:, :, None, :], sin[:, :, None, :]
            out.append(torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2))
        return tuple(out)

    for case in spec.golden:
        if case.shape["D"] > 2 and (case.params["positions"] != "arange" or case.shape["S"] > 1):
            assert fails_rule(spec, case, torch.bfloat16, interleaved), case.why


PLANTS = [
    Plant("rope_interleaved_pairs", "rope", "rope.mojo",
          "base + i + half]", "base + 2 * i + 1]"),
    Plant("rope_rotates_backwards", "rope", "rope.mojo",
          "return (x1 * c - x2 * s, x2 * c + x1 * s)", "return (x1 * c + x2 * s, x2 * c - x1 * s)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    assert_caught(kt, tmp_path, p)


# --- the Triton twin -------------------------------------------------------------------------

TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases("rope", [
    Case(SPEC.complete({"B": 4, "S": 300, "Hk": 8, "group": 4, "D": 128}),
         {"positions": "random", "theta": 500000.0, "factor": 8.0},
         "largest shape: many programs along tokens, the last one partial"),
])
PLANTED_SIGN = twins.register_call("rope-planted-sign", "test_rope:planted_rope_sign")


def planted_rope_sign() -> dict:
    """Run in the interpreted child: the twin rotating by the wrong angle sign."""
    case = next(c for c in SPEC.golden if "Llama 3 8B heads" in c.why)
    params = SPEC.full_params(case.params)
    inputs = SPEC.make_inputs(case.shape, params, torch.bfloat16, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    flipped = dict(inputs, positions=-inputs["positions"])
    out = SPEC.triton(flipped, params)[0]
    base = SPEC.reference(inputs, params)[0]
    truth = SPEC.reference({k: v.double() if v.is_floating_point() else v
                            for k, v in inputs.items()}, params)[0]
    return {"k": SPEC.tolerance_k, "err": (out.double() - truth).abs().max().item(),
            "base": (base.double() - truth).abs().max().item(),
            "ulp": torch.finfo(torch.bfloat16).eps * truth.abs().max().item()}


@pytest.mark.parametrize("twin_case", [PLANTED_SIGN])
def test_interpreted_twin_catches_a_planted_bug(twin_case):
    """The rule has teeth: a rotation by the wrong angle sign fails it."""
    result = twins.interpreted(twin_case)
    assert result["err"] > result["k"] * result["base"] + result["ulp"]


# --- benchmarks ------------------------------------------------------------------------------

def test_gpu_families_are_rope_alone_at_16m_elements_or_more():
    for fam in load_families(SPEC).values():
        if fam.device == "gpu":  # "RoPE alone at >= 16M elements" (of q and k)
            assert all(s["B"] * s["S"] * (s["Hq"] + s["Hk"]) * s["D"] >= 16 * 2**20
                       for s, _ in fam.cases)


def test_targets_are_the_share_of_hbm_and_the_twin_on_a_gpu_only():
    """Issue 10: at least 85 % of the HBM datasheet bandwidth, and no slower than the Triton
    twin (a ratio over interleaved rounds, with its interval)."""
    row = {"kernel": "rope", "provider": "kt_graph", "family": "prefill", "label": "S=4096",
           "status": "ok", "p50": 0.1, "gb_s": 4200.0, "pct_peak": 87.5, "backend": "cuda",
           "ratios": {"triton": {"ratio": 1.02, "lo": 1.01, "hi": 1.03}}}
    twin = {"kernel": "rope", "provider": "triton", "family": "prefill", "label": "S=4096",
            "status": "ok", "p50": 0.098, "backend": "cuda"}
    lines = target_lines(SPEC, [row, twin])
    assert "targets prefill S=4096: kt_graph 4200 GB/s = 87.5% of HBM (target >= 85%)" in lines
    # the copy yardstick of the same case, beside it: the rate this GPU reaches at all
    copy = dict(twin, provider="copy_alone", yardstick=True, gb_s=4320.0, pct_peak=90.0)
    elsewhere = dict(copy, label="S=8192", pct_peak=70.0)
    lines = target_lines(SPEC, [row, twin, copy, elsewhere])
    assert ("targets prefill S=4096: kt_graph 4200 GB/s = 87.5% of HBM (target >= 85%); "
            "beside it copy_alone [yardstick] 90.0%") in lines
    assert any("kt/triton 1.020 [1.010, 1.030] (no slower than the Triton twin missed)" in ln for ln in lines)
    assert target_lines(SPEC, [dict(row, backend="cpu")]) == []


# --- stock MAX timed like kt (issue 11 part 2) ----------------------------------------------

def _ops(graph) -> set[str]:
    import re

    return set(re.findall(r"\b(?:r?mo)\.[a-z_.]+", str(graph)))


def test_stock_max_rope_graph_holds_no_host_value_and_the_wrapper_copies_one_per_call():
    """Why `max_rope` could not be timed like kt_graph, and that it now can: MAX's wrapper
    `rope_ragged_with_position_ids` turns the input's shape into a host tensor and copies it
    to the GPU in every call (a copy that waits for the stream); the provider's own graph
    takes every value as a device input."""
    from max.graph import DeviceRef

    from pykernels.rope import max_rope_graph

    direct = _ops(max_rope_graph(torch.bfloat16, 128, DeviceRef.GPU(0), wrapper=False))
    wrapper = _ops(max_rope_graph(torch.bfloat16, 128, DeviceRef.GPU(0), wrapper=True))
    assert "mo.rope.ragged.with_position_id" in direct
    assert not {op for op in direct if "transfer" in op or "shape_to_tensor" in op}
    assert {"rmo.shape_to_tensor", "rmo.mo.transfer"} <= wrapper


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["max_rope", "max_rope_wrapper"])
def test_stock_max_rope_passes_the_gate_on_the_cpu(provider):
    from harness.bench.gate import Gate

    prep = SPEC.providers[provider]("cpu", torch.bfloat16)
    shape = SPEC.complete({"B": 2, "S": 33, "Hk": 2, "group": 3, "D": 80})
    params = SPEC.full_params({"positions": "random", "theta": 500000.0, "factor": 8.0})
    inputs = SPEC.make_inputs(shape, params, torch.bfloat16, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    bound = prep(inputs, params)
    checks = Gate(SPEC, shape, params, inputs).check(bound.to_torch(bound.run()))
    assert checks and all(c.passed for c in checks), checks
