"""RoPE + store into MAX's paged KV cache: the paged layout helpers, the reference against an
independent formulation (positions walked one token at a time, complex-rotation RoPE, flat
offsets computed by hand), what the golden cases catch, a planted Mojo bug and the Triton
twin on extra cases."""

from __future__ import annotations

import pytest
import torch

import pykernels
import pykernels._paged_kv as pkv
import twins
from harness.spec import Case
from kernel_helpers import (LLAMA3, assert_families_are_maxs_serving_cache,
                            assert_stock_max_paged_passes_the_gate, fails_rule, golden_case,
                            inputs_for, rope_complex)
from plants import Plant, assert_caught

SPEC = pykernels.get("paged_rope_store")


def test_kernel_params_in_op_order():
    """The Mojo op takes its scalars in exactly this order."""
    assert [p.name for p in SPEC.kernel_params()] == [
        "layer", "theta", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position"]
    assert [t.name for t in SPEC.inputs] == ["k", "v", "blocks", "cache_lengths",
                                             "lookup_table", "row_offsets"]
    assert [t.name for t in SPEC.checked] == ["blocks"]


# --- the paged layout ------------------------------------------------------------------------

def test_ragged_lengths_and_pages_follow_the_axes():
    shape = SPEC.complete({"B": 3, "S": 10, "C": 20, "R": 4, "page": 8, "L": 1, "Hk": 1, "D": 16})
    assert pkv.new_tokens(shape) == [10, 6, 2]
    assert pkv.cached_tokens(shape) == [20, 8, 17]
    assert pkv.pages_per_seq(shape) == [4, 2, 3]
    assert (shape["T"], shape["P"], shape["NP"]) == (18, 11, 5)
    flat = SPEC.complete({"B": 2, "S": 5, "C": 3, "R": 0, "page": 8, "L": 1, "Hk": 1, "D": 16})
    assert pkv.new_tokens(flat) == [5, 5] and pkv.cached_tokens(flat) == [3, 3]


def test_cache_pages_are_owned_once_and_unused_slots_are_nan():
    shape, _, inp = inputs_for(SPEC, {"B": 3, "S": 9, "C": 30, "R": 5, "page": 4, "L": 2, "Hk": 2,
                                      "D": 16}, {})
    table = inp["lookup_table"].to(torch.int64)
    owned = [int(p) for b, n in enumerate(pkv.pages_per_seq(shape)) for p in table[b, :n]]
    assert len(set(owned)) == len(owned) and 0 not in owned  # page 0 is the null block
    assert (table[:, -1] == 0).all()  # the padding column
    blocks = inp["blocks"]
    assert torch.isnan(blocks[0]).all()
    spare = set(range(1, shape["P"])) - set(owned)
    assert len(spare) == 1 and torch.isnan(blocks[spare.pop()]).all()
    for b, (first, n, cached) in enumerate(pkv.sequences(inp)):
        k, _ = pkv.gather(inp, b, 0, cached + n)
        assert torch.isfinite(k[:cached]).all() and torch.isnan(k[cached:]).all()


# --- the reference ---------------------------------------------------------------------------

def _store_by_hand(inp, params):
    """Token by token: its sequence from the offsets, its position, the flat element offset
    of its slot computed from the layout's strides, RoPE by complex rotation."""
    blocks = inp["blocks"].clone()
    n_pages, _, layers, page, hk, d = blocks.shape
    flat = blocks.view(-1)
    offsets = [int(x) for x in inp["row_offsets"]]
    table = inp["lookup_table"].to(torch.int64)
    for row in range(inp["k"].shape[0]):
        b = max(i for i in range(len(offsets) - 1) if offsets[i] <= row)
        pos = int(inp["cache_lengths"][b]) + row - offsets[b]
        p = int(table[b, pos // page])
        k = rope_complex(inp["k"][row][None, None], torch.tensor([[pos]]), params)[0, 0]
        for kv, x in ((0, k), (1, inp["v"][row])):
            for h in range(hk):
                at = ((((p * 2 + kv) * layers + params["layer"]) * page + pos % page) * hk + h) * d
                flat[at:at + d] = x[h]
    return blocks


STORE_SHAPES = [
    {"B": 1, "S": 1, "C": 0, "R": 0, "page": 16, "L": 1, "Hk": 1, "D": 16},
    {"B": 3, "S": 12, "C": 40, "R": 5, "page": 3, "L": 2, "Hk": 2, "D": 32},
    {"B": 2, "S": 1, "C": 128, "R": 0, "page": 128, "L": 1, "Hk": 2, "D": 80},
    {"B": 4, "S": 30, "C": 7, "R": 11, "page": 1, "L": 3, "Hk": 1, "D": 64},
]


@pytest.mark.parametrize("free", STORE_SHAPES, ids=lambda f: "x".join(map(str, f.values())))
@pytest.mark.parametrize("layer", [0, 1])
def test_reference_matches_a_token_by_token_store(free, layer):
    if layer >= free["L"]:
        pytest.skip("the cache has one layer")
    _, params, inp = inputs_for(SPEC, free, dict(LLAMA3, layer=layer))
    (blocks,) = SPEC.reference(inp, params)
    torch.testing.assert_close(blocks, _store_by_hand(inp, params), rtol=1e-10, atol=1e-10,
                               equal_nan=True)


def test_reference_writes_only_the_new_slots():
    _, params, inp = inputs_for(SPEC, STORE_SHAPES[1], dict(LLAMA3, layer=1))
    (blocks,) = SPEC.reference(inp, params)
    changed = ~(torch.isnan(blocks) & torch.isnan(inp["blocks"])) & (blocks != inp["blocks"])
    hk, d = inp["k"].shape[1:]
    assert int(changed.sum()) == inp["k"].shape[0] * 2 * hk * d
    assert not changed[:, :, 0].any()  # layer 0 untouched


# --- golden cases against the bugs they guard against ----------------------------------------

def _buggy_store(position_of):
    """A store that takes each token's position from `position_of(cached, t)`."""
    def run(inp, params):
        blocks = inp["blocks"].clone()
        layer = params["layer"]
        for b, (first, n, cached) in enumerate(pkv.sequences(inp)):
            for t in range(n):
                pos = position_of(cached, t)
                k = rope_complex(inp["k"][first + t][None, None].double(), torch.tensor([[pos]]),
                                 params)[0, 0].to(blocks.dtype)
                pages, slot = pkv.slots(inp, b, range(cached + t, cached + t + 1))
                blocks[pages, 0, layer, slot] = k
                blocks[pages, 1, layer, slot] = inp["v"][first + t][None]
        return (blocks,)
    return run


def test_golden_catches_keys_rotated_at_their_row_not_their_position():
    for fragment in ("spanning a page boundary", "after a full page"):
        case = golden_case(SPEC, fragment)
        assert fails_rule(SPEC, case, torch.bfloat16, _buggy_store(lambda cached, t: t))


def test_golden_catches_the_slot_taken_modulo_the_wrong_page():
    case = golden_case(SPEC, "after a full page")

    def slot_from_page_count(inp, params):
        (blocks,) = SPEC.reference(inp, params)
        bad = inp["blocks"].clone()
        # the right values, written one slot late (into the NaN slot after the position)
        for b, (first, n, cached) in enumerate(pkv.sequences(inp)):
            pages, slot = pkv.slots(inp, b, range(cached, cached + n))
            bad[pages, :, params["layer"], slot + 1] = blocks[pages, :, params["layer"], slot]
        return (bad,)

    assert fails_rule(SPEC, case, torch.float32, slot_from_page_count)


PLANTS = [
    Plant("store_position_without_cache_length", "paged_rope_store", "paged_rope_store.mojo",
          "    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])\n"
          "    var d = lay.head_dim\n    var half = d // 2\n    for h in range(lay.kv_heads):",
          "    var pos = row - Int(row_offsets[unsafe_offset=b])\n"
          "    var d = lay.head_dim\n    var half = d // 2\n    for h in range(lay.kv_heads):"),
]


@pytest.mark.slow
@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    assert_caught(kt, tmp_path, p)


# --- the Triton twin -------------------------------------------------------------------------

TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases("paged_rope_store", [
    Case(pkv.full_shape(4, 30, 7, 11, 1, 3, Hk=1, D=64), dict(LLAMA3, layer=2),
         "one token per page, four ragged sequences, the last of three layers"),
    Case(pkv.full_shape(2, 60, 500, 3, 256, 1, Hk=2, D=96), LLAMA3,
         "positions past 500 on 256-token pages"),
])


# --- benchmarks ------------------------------------------------------------------------------

@pytest.mark.slow
def test_stock_max_paged_kernels_pass_the_gate_on_the_same_cache():
    assert_stock_max_paged_passes_the_gate(SPEC)


def test_families_are_maxs_serving_cache():
    assert_families_are_maxs_serving_cache(SPEC)
