"""Fused RoPE + attention: the reference against SDPA with the mask and the GQA head map
spelled out, the golden cases against the bugs they guard against, the Mojo op's scalar
order, planted Mojo bugs, the Triton twin on extra cases, the benchmark families, the checked
slices of huge outputs, the cudnn_alone yardstick and the speed targets."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import pykernels
import twins
from harness.bench.engine import Settings, benchmark_families
from harness.bench.families import cases_where, load_bench_file, load_families
from harness.bench.summary import summary, target_lines
from harness.spec import Case
from kernel_helpers import LLAMA3, fails_rule, golden_case, inputs_for, rope_complex
from plants import Plant, assert_caught
from pykernels import fused_rope_attention as fra
from pykernels._common import apply_rope, rope_cos_sin

SPEC = pykernels.get("fused_rope_attention")


def test_kernel_params_in_op_order():
    """The Mojo op takes its scalars in exactly this order."""
    assert [p.name for p in SPEC.kernel_params()] == [
        "scale", "causal", "theta", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position"]


# --- the reference ---------------------------------------------------------------------------

def _attention_sdpa(inp, params):
    """RoPE by complex rotation, kv head h // group, an explicit bottom-right boolean mask."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    b, sq, hq, d = q.shape
    skv, hk = k.shape[1], k.shape[2]
    qpos = torch.arange(skv - sq, skv)
    kpos = torch.arange(skv)
    q = rope_complex(q, qpos.expand(b, sq), params)
    k = rope_complex(k, kpos.expand(b, skv), params)
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
    _, params, inp = inputs_for(spec, free, params)
    (o,) = spec.reference(inp, params)
    torch.testing.assert_close(o, _attention_sdpa(inp, params), rtol=1e-9, atol=1e-9)


def test_square_causal_is_sdpa_is_causal_and_decode_sees_everything():
    spec = pykernels.get("fused_rope_attention")
    _, params, inp = inputs_for(spec, {"B": 1, "Sq": 20, "cache": 0, "Hk": 1, "group": 1, "D": 32},
                             {"causal": 1})
    (o,) = spec.reference(inp, params)
    q = rope_complex(inp["q"], torch.arange(20).expand(1, 20), params)
    k = rope_complex(inp["k"], torch.arange(20).expand(1, 20), params)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          inp["v"].transpose(1, 2), is_causal=True)
    torch.testing.assert_close(o, want.transpose(1, 2), rtol=1e-10, atol=1e-10)
    _, params, inp = inputs_for(spec, {"B": 2, "Sq": 1, "cache": 50, "Hk": 2, "group": 2, "D": 64},
                             {"causal": 1})
    (causal,) = spec.reference(inp, params)
    (full,) = spec.reference(inp, dict(params, causal=0))
    assert torch.equal(causal, full)


def test_huge_logits_overflow_naive_softmax_but_stay_spread():
    spec = pykernels.get("fused_rope_attention")
    free = {"B": 1, "Sq": 8, "cache": 40, "Hk": 1, "group": 1, "D": 64}
    for scale in (0.0, 0.3):
        _, params, inp = inputs_for(spec, free, {"logits": "huge", "scale": scale}, torch.float32)
        d = 64
        q = apply_rope(inp["q"], *rope_cos_sin(torch.arange(40, 48).expand(1, 8), d,
                                                          params, torch.float32))
        k = apply_rope(inp["k"], *rope_cos_sin(torch.arange(48).expand(1, 48), d,
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


# --- golden cases, planted bugs -------------------------------------------------------------

def test_golden_catches_top_left_causal_mask():
    spec = pykernels.get("fused_rope_attention")

    def top_left(inp, params):
        q, k, v = inp["q"], inp["k"], inp["v"]
        sq, skv = q.shape[1], k.shape[1]
        # rope and GQA right, mask aligned to the top-left corner: query i sees keys j <= i.
        pos_q = torch.arange(skv - sq, skv).expand(q.shape[0], sq)
        pos_k = torch.arange(skv).expand(k.shape[0], skv)
        q = apply_rope(q, *rope_cos_sin(pos_q, q.shape[-1], params, q.dtype))
        k = apply_rope(k, *rope_cos_sin(pos_k, k.shape[-1], params, k.dtype))
        g = q.shape[2] // k.shape[2]
        s = torch.einsum("bqhd,bkhd->bhqk", q * fra.softmax_scale(params, q.shape[-1]),
                         k.repeat_interleave(g, 2))
        s = s.masked_fill(torch.arange(skv)[None, :] > torch.arange(sq)[:, None], float("-inf"))
        return (torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(g, 2)),)

    assert fails_rule(spec, golden_case(spec, "bottom-right"), torch.bfloat16, top_left)


def test_golden_catches_softmax_without_max_subtraction():
    spec = pykernels.get("fused_rope_attention")

    def naive(inp, params):
        (o,) = spec.reference(inp, params)
        q, k = inp["q"], inp["k"]
        sq, skv = q.shape[1], k.shape[1]
        pos_q = torch.arange(skv - sq, skv).expand(q.shape[0], sq)
        pos_k = torch.arange(skv).expand(k.shape[0], skv)
        q = apply_rope(q, *rope_cos_sin(pos_q, q.shape[-1], params, q.dtype))
        k = apply_rope(k, *rope_cos_sin(pos_k, k.shape[-1], params, k.dtype))
        g = q.shape[2] // k.shape[2]
        e = torch.einsum("bqhd,bkhd->bhqk", q * fra.softmax_scale(params, q.shape[-1]),
                         k.repeat_interleave(g, 2)).float().exp()
        p = e / e.sum(-1, keepdim=True)
        return (torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), inp["v"].repeat_interleave(g, 2)),)

    for fragment in ("exp overflows fp32", "decode with logits"):
        for dtype in (torch.float32, torch.bfloat16):
            assert fails_rule(spec, golden_case(spec, fragment), dtype, naive)


PLANTS = [
    Plant("attention_causal_off_by_one", "fused_rope_attention", "fused_rope_attention.mojo",
          "var n_keys = q_pos + 1 if causal != 0 else skv", "var n_keys = q_pos if causal != 0 else skv"),
    Plant("attention_missing_scale", "fused_rope_attention", "fused_rope_attention.mojo",
          "var s = dot * sm_scale", "var s = dot"),
    Plant("attention_softmax_overflow", "fused_rope_attention", "fused_rope_attention.mojo",
          "var p = exp(scores[unsafe_offset=j] - m)", "var p = exp(scores[unsafe_offset=j])"),
    Plant("attention_wrong_gqa_head", "fused_rope_attention", "fused_rope_attention.mojo",
          "                var kvh = h // (hq // hk)", "                var kvh = h % hk"),
    Plant("attention_q_rotated_at_index_not_position", "fused_rope_attention",
          "fused_rope_attention.mojo",
          "_rotated_row(q_rot, qp.unsafe_offset(r * head_dim), head_dim, q_pos, freqs)",
          "_rotated_row(q_rot, qp.unsafe_offset(r * head_dim), head_dim, i, freqs)"),
    # correct at every position below 2048 (fp16 holds those integers exactly), which is all
    # kt drew before the golden case at Llama 3.1's last position
    Plant("attention_positions_in_fp16", "fused_rope_attention", "fused_rope_attention.mojo",
          "var angle = Float32(pos) * freqs.inv_freq(i, head_dim)",
          "var angle = Float32(pos).cast[DType.float16]().cast[DType.float32]() * "
          "freqs.inv_freq(i, head_dim)"),
]


def test_only_the_whole_context_catches_positions_in_fp16():
    """RoPE at positions rounded to fp16 (inf above 65504) passes every case that stays below
    2048 tokens and fails the decode at position 131071."""
    spec = SPEC

    def fp16_positions(inp, params):
        q, k, v = (inp[n].float() for n in ("q", "k", "v"))
        b, sq, hq, d = q.shape
        skv = k.shape[1]
        qpos, kpos = torch.arange(skv - sq, skv), torch.arange(skv)
        q = apply_rope(q, *rope_cos_sin(qpos.half().float().expand(b, sq), d, params, q.dtype))
        k = apply_rope(k, *rope_cos_sin(kpos.half().float().expand(b, skv), d, params, q.dtype))
        g = hq // k.shape[2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q * fra.softmax_scale(params, d),
                              k.repeat_interleave(g, 2))
        if params["causal"]:
            scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.repeat_interleave(g, 2))
        return (o.to(inp["q"].dtype),)

    for fragment in ("Llama 3 8B heads (32 q, 8 kv, D 128)", "long decode, 8 q heads"):
        assert not fails_rule(spec, golden_case(spec, fragment), torch.float32, fp16_positions)
    assert fails_rule(spec, golden_case(spec, "last position of Llama 3.1"), torch.float32,
                      fp16_positions)


@pytest.mark.slow
@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    assert_caught(kt, tmp_path, p)


# --- the Triton twin -------------------------------------------------------------------------

TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases("fused_rope_attention", [
    Case(SPEC.complete({"B": 1, "Sq": 3, "cache": 600, "Hk": 1, "group": 2, "D": 64}),
         {"causal": 1}, "Skv = 603 spans several KV tiles: the online-softmax rescale runs"),
    Case(SPEC.complete({"B": 2, "Sq": 2, "cache": 300, "Hk": 2, "group": 1, "D": 32}),
         {"causal": 0, "logits": "huge"}, "several KV tiles with logits about 150, non-causal"),
    Case(SPEC.complete({"B": 1, "Sq": 300, "cache": 0, "Hk": 1, "group": 1, "D": 16}),
         {"causal": 1}, "more query rows than one tile: later tiles start their causal loop late"),
])


# --- benchmarks ------------------------------------------------------------------------------

def test_issue_families_are_covered():
    att = load_families(SPEC)
    prefill = [s for f in ("prefill", "prefill_gqa") for s, _ in att[f].cases]
    assert {(s["B"], s["Sq"]) for s in prefill} == {(8, 1024), (2, 4096), (1, 8192), (1, 16384)}
    assert {s["Hq"] for s in prefill} == {32} and {s["Hk"] for s in prefill} == {8, 32}
    assert {p["causal"] for f in ("prefill", "prefill_gqa") for _, p in att[f].cases} == {0, 1}
    decode = att["decode"].cases
    assert {s["Sq"] for s, _ in decode} == {1} and all(s["group"] > 1 for s, _ in decode)
    assert min(s["Skv"] for s, _ in decode) == 1024 and max(s["Skv"] for s, _ in decode) == 32768


def test_check_views_cover_first_and_last_heads_with_their_kv_heads():
    shape = SPEC.complete({"B": 2, "Sq": 3, "cache": 1, "Hk": 2, "group": 4, "D": 16})
    views = SPEC.bench_views(shape)
    assert len(views) == 4
    last = views[-1]
    assert last["q"][2] == slice(7, 8) and last["k"][2] == slice(1, 2) and last["o"] == last["q"]


def test_warm_jobs_split_a_family_by_param():
    fam = load_families(SPEC)["prefill"]
    causal = cases_where(fam, ["causal=1"])
    assert causal.cases and {p["causal"] for _, p in causal.cases} == {1}
    assert len(causal.cases) + len(cases_where(fam, ["causal=0"]).cases) == len(fam.cases)


@pytest.mark.parametrize("ruler", ["cudnn_alone", "max_flash_alone"])
def test_attention_yardsticks_are_na_on_cpu(ruler):
    settings = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    rec = benchmark_families(SPEC, "cpu", [load_families(SPEC)["cpu"]], [ruler],
                             settings=settings)
    assert {r["status"] for r in rec["rows"]} == {"n/a"}
    assert all("n/a on cpu" in r["note"] for r in rec["rows"])


@pytest.mark.gpu
def test_gpu_cudnn_alone_is_an_unchecked_yardstick_beside_the_op():
    settings = Settings(warmup_ms=5, min_reps=5, max_reps=20, budget_s=0.2)
    rec = benchmark_families(SPEC, "gpu", [load_families(SPEC)["cpu"]],
                             ["cudnn_alone", "torch_cudnn"], settings=settings)  # tiny GQA
    rulers = [r for r in rec["rows"] if r["provider"] == "cudnn_alone"]
    if all(r["status"] == "n/a" for r in rulers):
        pytest.skip(f"no cuDNN attention here: {rulers[0]['note']}")
    for r in rulers:
        assert r["status"] == "ok" and r["yardstick"] is True and "check" not in r
        assert "not checked" in r["note"] and r.get("baseline") != "cudnn_alone"


# --- speed targets ---------------------------------------------------------------------------

def _att(provider, p50, family="prefill", label="B=1 Sq=8192 causal=0", **kw):
    return {"kernel": "fused_rope_attention", "provider": provider, "family": family,
            "label": label, "status": "ok", "p50": p50, **kw}


def test_target_lines_state_each_target_as_a_ratio_from_one_run():
    """A file saved before interleaving (no `ratios`): the p50s' ratio, said to have no
    interval."""
    lines = target_lines(SPEC, [_att("kt_graph", 1.9), _att("cudnn_alone", 2.0),
                                _att("torch_compile", 2.5), _att("max_flash", 1.8),
                                _att("kt_graph", 0.5, family="decode", gb_s=2700.0,
                                     pct_peak=80.6)])
    (prefill,) = [ln for ln in lines if "prefill" in ln]
    assert "goal kt/cudnn_alone 0.950 (p50s, no interval: no verdict)" in prefill
    assert "milestone kt/torch_compile 0.760 (p50s, no interval: no verdict)" in prefill
    assert "kt/max_flash 1.056 (p50s, no interval: no verdict)" in prefill
    assert any("decode" in ln and "80.6% of HBM" in ln for ln in lines)


def test_target_lines_use_the_interleaved_interval_and_keep_out_what_was_timed_otherwise():
    ratios = {"cudnn_alone": {"ratio": 0.965, "lo": 0.93, "hi": 0.99},
              "torch_compile": {"ratio": 0.97, "lo": 0.96, "hi": 1.01}}
    lines = target_lines(SPEC, [_att("kt_graph", 1.9, ratios=ratios), _att("cudnn_alone", 2.0),
                                _att("torch_compile", 2.5),
                                _att("max_flash", 1.8, ratio_excluded="host-synced timing")])
    (prefill,) = lines
    assert "goal kt/cudnn_alone 0.965 [0.930, 0.990] (goal met, moonshot within noise)" in prefill
    assert "milestone kt/torch_compile 0.970 [0.960, 1.010] (milestone within noise)" in prefill
    assert "kt/max_flash: max_flash kept out: host-synced timing" in prefill


def test_prefill_cases_state_what_the_rope_pass_costs_over_maxs_attention_alone():
    """kt's GPU prefill is its RoPE pass, then MAX's flash attention: kt_graph over the
    yardstick max_flash_alone is stated per prefill case (a breakdown, no verdict)."""
    ratios = {"max_flash_alone": {"ratio": 1.15, "lo": 1.14, "hi": 1.16}}
    (prefill,) = target_lines(SPEC, [_att("kt_graph", 1.9, ratios=ratios),
                                     _att("max_flash_alone", 1.65, yardstick=True)])
    assert prefill.endswith("kt/max_flash_alone 1.150 [1.140, 1.160]")
    # compiled ahead on a GPU like max_flash: one job per (kv heads, mask)
    assert load_bench_file(SPEC).warm_split["max_flash_alone"] == ("Hk", "causal")


def test_goal_verdicts_at_their_thresholds():
    (goal,) = [t for t in SPEC.targets if getattr(t, "name", "") == "goal"]
    assert goal.verdict(0.90, 0.94) == "goal met, moonshot met"
    assert goal.verdict(0.96, 0.99) == "goal met, moonshot missed"
    assert goal.verdict(0.97, 1.03) == "goal within noise, moonshot missed"
    assert goal.verdict(1.001, 1.1) == "goal missed, moonshot missed"


def test_summary_prints_the_goal_ratio_for_every_prefill_case(tmp_path):
    from rich.console import Console

    rows = []
    for label, kt, ruler in (("B=8 Sq=1024 causal=0", 0.50, 0.45), ("B=8 Sq=1024 causal=1", 0.30,
                                                                      0.32)):
        for provider, p50 in (("kt_graph", kt), ("cudnn_alone", ruler), ("torch_cudnn", 0.9)):
            rows.append(_att(provider, p50, label=label, shape={"Sq": 1024}, params={},
                             yardstick=provider == "cudnn_alone"))
    rows.append(_att("kt_graph", 0.2, family="decode", label="B=8 Skv=1024", shape={"Sq": 1},
                     params={}))
    path = tmp_path / "att.json"
    path.write_text(json.dumps({"kernel": "fused_rope_attention", "device": "H100",
                                "timer": "CUDA events", "rows": rows,
                                "families": {"prefill": {"x": "Sq"}, "decode": {"x": "Sq"}}}))
    console = Console(width=250, record=True)
    summary([str(path)], console)
    text = console.export_text()
    assert ("targets prefill B=8 Sq=1024 causal=0: goal kt/cudnn_alone 1.111 (p50s, no "
            "interval: no verdict)" in text)
    assert ("targets prefill B=8 Sq=1024 causal=1: goal kt/cudnn_alone 0.938 (p50s, no "
            "interval: no verdict)" in text)
    assert "cudnn_alone [yardstick] 0.450" in text
    assert "goal kt/cudnn_alone" not in "".join(ln for ln in text.splitlines() if "decode" in ln)
