"""RoPE + attention over MAX's paged KV cache: the reference against an independent
formulation (each sequence's cache gathered to a dense tensor by flat offsets, complex-rotation
RoPE, SDPA with an explicit mask and head map), what the golden cases catch, planted Mojo bugs
and the Triton twin on extra cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
import pykernels._paged_kv as pkv
import twins
from harness.spec import Case
from harness.verify.engine import case_problem
from kernel_helpers import (LLAMA3, assert_families_are_maxs_serving_cache,
                            assert_stock_max_paged_passes_the_gate, fails_rule, golden_case,
                            inputs_for, rope_complex)
from plants import Plant, assert_caught
from pykernels import paged_rope_attention as pra
from pykernels._common import apply_rope, rope_cos_sin

SPEC = pykernels.get("paged_rope_attention")


def test_kernel_params_in_op_order():
    """The Mojo op takes its scalars in exactly this order."""
    assert [p.name for p in SPEC.kernel_params()] == [
        "layer", "max_prompt_length", "max_cache_length", "scale", "theta", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position"]
    assert [t.name for t in SPEC.inputs] == ["q", "blocks", "cache_lengths", "lookup_table",
                                             "row_offsets"]
    assert [t.name for t in SPEC.checked] == ["o", "blocks"]


def test_max_lengths_are_exact_from_the_inputs_or_unknown():
    """The op gets the batch's most new tokens and longest sequence (cached + new), as MAX's
    paged collection carries them, for "exact", and 0 (unknown: the op's bounds from shapes)
    as given; both are drawn, golden cases hold both, and a replayed case may name either."""
    _, params, inp = inputs_for(SPEC, {"B": 3, "S": 12, "C": 40, "R": 5, "page": 3, "L": 1,
                                       "Hk": 1, "group": 1, "D": 16}, {})
    seqs = pkv.sequences(inp)
    assert [n for _, n, _ in seqs] == [12, 7, 2] and [c for _, _, c in seqs] == [40, 25, 10]
    args = {p.name: p.op_value(params, inp) for p in SPEC.kernel_params()}
    assert (args["max_prompt_length"], args["max_cache_length"]) == (12, 52)
    unknown = dict(params, max_prompt_length=0, max_cache_length=0)
    assert [p.op_value(unknown, inp) for p in pra.MAX_LENGTHS] == [0, 0]
    assert all(p.choices == ("exact", 0) for p in pra.MAX_LENGTHS)
    for known in (True, False):
        assert any((SPEC.full_params(c.params)["max_prompt_length"] == "exact") == known
                   and c.shape["page"] == 128 and c.shape["Hk"] == 8 and c.shape["T"] > c.shape["B"]
                   for c in SPEC.golden)
    case = {"dtype": "bfloat16", "layout": "dense", "data_seed": 0, "shape": {
        "B": 1, "S": 1, "C": 0, "R": 0, "page": 16, "L": 1, "Hk": 1, "group": 1, "D": 16}}
    for value in ("exact", 0, 7):
        assert case_problem(SPEC, dict(case, params={"max_cache_length": value})) is None
    assert "kernel argument" in case_problem(SPEC, dict(case, params={"max_cache_length": "big"}))


# --- the reference ---------------------------------------------------------------------------

def _dense_cache(inp, b, layer, length):
    """Keys and values [length, Hk, D] of sequence b, read by flat offsets from the layout."""
    blocks = inp["blocks"]
    _, _, layers, page, hk, d = blocks.shape
    flat = blocks.reshape(-1)
    table = inp["lookup_table"].to(torch.int64)
    out = torch.empty(2, length, hk, d, dtype=blocks.dtype)
    for pos in range(length):
        p = int(table[b, pos // page])
        for kv in range(2):
            at = (((p * 2 + kv) * layers + layer) * page + pos % page) * hk * d
            out[kv, pos] = flat[at:at + hk * d].view(hk, d)
    return out[0], out[1]


def _attention_sdpa(inp, params):
    q = inp["q"]
    hq, d = q.shape[1:]
    o = torch.empty_like(q)
    offsets = [int(x) for x in inp["row_offsets"]]
    for b in range(len(offsets) - 1):
        first, n = offsets[b], offsets[b + 1] - offsets[b]
        cached = int(inp["cache_lengths"][b])
        k, v = _dense_cache(inp, b, params["layer"], cached + n)
        qpos = torch.arange(cached, cached + n)
        qr = rope_complex(q[first:first + n][None], qpos[None], params)[0]
        heads = torch.arange(hq) // (hq // k.shape[1])
        mask = torch.arange(cached + n)[None, :] <= qpos[:, None]
        scale = None if params["scale"] <= 0 else torch.tensor(params["scale"],
                                                                 dtype=torch.float32).item()
        att = F.scaled_dot_product_attention(qr.transpose(0, 1), k[:, heads].transpose(0, 1),
                                             v[:, heads].transpose(0, 1), attn_mask=mask,
                                             scale=scale)
        o[first:first + n] = att.transpose(0, 1)
    return o


ATTN_SHAPES = [
    {"B": 1, "S": 1, "C": 0, "R": 0, "page": 16, "L": 1, "Hk": 1, "group": 1, "D": 16},
    {"B": 3, "S": 12, "C": 40, "R": 5, "page": 3, "L": 2, "Hk": 2, "group": 3, "D": 32},
    {"B": 2, "S": 1, "C": 128, "R": 0, "page": 128, "L": 1, "Hk": 2, "group": 4, "D": 80},
    {"B": 4, "S": 30, "C": 7, "R": 11, "page": 1, "L": 1, "Hk": 1, "group": 8, "D": 64},
    {"B": 2, "S": 40, "C": 0, "R": 9, "page": 16, "L": 1, "Hk": 2, "group": 2, "D": 96},
]


@pytest.mark.parametrize("free", ATTN_SHAPES, ids=lambda f: "x".join(map(str, f.values())))
@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_reference_matches_sdpa_over_a_dense_copy(free, scale):
    _, params, inp = inputs_for(SPEC, free, dict(LLAMA3, scale=scale, layer=free["L"] - 1))
    o, blocks = SPEC.reference(inp, params)
    torch.testing.assert_close(o, _attention_sdpa(inp, params), rtol=1e-9, atol=1e-9)
    assert torch.equal(blocks.nan_to_num(7.0), inp["blocks"].nan_to_num(7.0))


def test_decode_sees_every_cached_key():
    """One new token: its softmax runs over cache + 1 keys, none masked, so the last
    sequence's output moves when its first cached value does."""
    _, params, inp = inputs_for(SPEC, {"B": 2, "S": 1, "C": 50, "R": 3, "page": 16, "L": 1,
                                       "Hk": 1, "group": 2, "D": 32}, {})
    o, _ = SPEC.reference(inp, params)
    first_page = int(inp["lookup_table"][1, 0])
    inp["blocks"][first_page, 1, 0, 0] += 100.0
    o2, _ = SPEC.reference(inp, params)
    assert torch.equal(o[0], o2[0]) and not torch.equal(o[1], o2[1])


# --- golden cases against the bugs they guard against ----------------------------------------

def _variant(q_position=None, visible=None, whole_pages=False):
    """The reference with the query's position or the keys it sees replaced (whole_pages: the
    keys gathered run to the end of the sequence's last page)."""
    def run(inp, params):
        q, blocks = inp["q"], inp["blocks"]
        hq, d = q.shape[1:]
        page = blocks.shape[3]
        o = torch.empty_like(q)
        for b, (first, n, cached) in enumerate(pkv.sequences(inp)):
            span = -(-(cached + n) // page) * page if whole_pages else cached + n
            k, v = pkv.gather(inp, b, params["layer"], span)
            k, v = (x.repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))
            qpos = torch.arange(cached, cached + n)
            rot = qpos if q_position is None else q_position(qpos, cached)
            qr = apply_rope(q[None, first:first + n], *rope_cos_sin(rot[None], d, params,
                                                                    q.dtype))[0]
            s = torch.einsum("qhd,khd->hqk", qr * pra.softmax_scale(params, d), k)
            kpos = torch.arange(span)
            seen = kpos[None, :] <= qpos[:, None] if visible is None else visible(kpos, qpos, cached)
            s = s.masked_fill(~seen[None], float("-inf"))
            o[first:first + n] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
        return o, blocks.clone()
    return run


def test_golden_catches_queries_rotated_at_their_row():
    for fragment in ("after a cached prefix", "Llama 3 8B decode"):
        case = golden_case(SPEC, fragment)
        assert fails_rule(SPEC, case, torch.bfloat16, _variant(q_position=lambda qp, c: qp - c))


def test_golden_catches_a_mask_that_ignores_the_cache():
    """Top-left alignment inside the sequence (query t sees keys j <= t)."""
    case = golden_case(SPEC, "after a cached prefix")
    bug = _variant(visible=lambda kpos, qpos, cached: kpos[None, :] <= (qpos - cached)[:, None])
    assert fails_rule(SPEC, case, torch.float32, bug)


def test_golden_catches_the_new_keys_left_out():
    """Attention over the cached prefix only: the step's own keys (what the store wrote)
    missing."""
    case = golden_case(SPEC, "ragged prefill")

    def cache_only(inp, params):
        o, blocks = _variant(visible=lambda kpos, qpos, cached: (kpos[None, :] < cached)
                             | (kpos[None, :] == 0))(inp, params)
        return o, blocks

    assert fails_rule(SPEC, case, torch.float32, cache_only)


def test_golden_catches_slots_past_the_sequence_weighed():
    """A mask bounded by the page rather than the sequence: the last page's slots past the
    sequence's tokens hold large finite values (a masked load of them, as MAX's flash attention
    does in a sequence's last key tile, weighs them 0 and passes), so weighing them fails."""
    case = golden_case(SPEC, "ragged prefill")
    bug = _variant(visible=lambda kpos, qpos, cached: (kpos[None, :] <= qpos[:, None])
                   | (kpos[None, :] > qpos[-1]), whole_pages=True)
    assert fails_rule(SPEC, case, torch.float32, bug)


PLANTS = [
    Plant("attention_q_rotated_at_row", "paged_rope_attention", "paged_rope_attention.mojo",
          "        var angle = Float32(pos) * freqs.inv_freq(i, d)",
          "        var angle = Float32(row - Int(row_offsets[unsafe_offset=b])) * freqs.inv_freq(i, d)"),
    Plant("attention_wrong_gqa_head", "paged_rope_attention", "paged_rope_attention.mojo",
          "    var kvh = h // (q_heads // lay.kv_heads)\n    var b = seq_of_row(row_offsets, batch, row)",
          "    var kvh = h % lay.kv_heads\n    var b = seq_of_row(row_offsets, batch, row)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    assert_caught(kt, tmp_path, p)


# --- the Triton twin -------------------------------------------------------------------------

TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases("paged_rope_attention", [
    Case(pkv.full_shape(2, 3, 600, 7, 64, 1, Hk=1, group=2, D=64), dict(LLAMA3, layer=0,
         scale=0.0), "600 cached keys: many key tiles, the online-softmax rescale runs"),
    Case(pkv.full_shape(1, 300, 0, 0, 128, 1, Hk=1, group=1, D=16), dict(LLAMA3, layer=0,
         scale=0.0), "a 300-token prefill over three pages"),
])


# --- benchmarks ------------------------------------------------------------------------------

@pytest.mark.slow
def test_stock_max_paged_kernels_pass_the_gate_on_the_same_cache():
    assert_stock_max_paged_passes_the_gate(SPEC)


def test_families_are_maxs_serving_cache():
    assert_families_are_maxs_serving_cache(SPEC)
