"""`--compare`'s noise rule on synthetic rows."""

from harness.bench.compare import REGRESSION_FLOOR, compare_records, regression_threshold


def _row(provider, p50, spread=0.02, **kw):
    return {"kernel": "k", "provider": provider, "shape": {"S": 1}, "params": {}, "dtype": "bf16",
            "device": "H100", "status": "ok", "p50": p50, "p10": p50 * (1 - spread / 2),
            "p90": p50 * (1 + spread / 2), "label": "S=1", **kw}


def test_compare_flags_a_regression_beyond_noise_only():
    old = [_row("a", 1.0), _row("b", 1.0), _row("c", 1.0, spread=0.2), _row("gone", 1.0)]
    new = [_row("a", 1.04), _row("b", 1.3), _row("c", 1.3, spread=0.2), _row("new", 1.0)]
    cmp = compare_records(new, old)
    verdict = {m["provider"]: m["regression"] for m in cmp["matched"]}
    assert verdict == {"a": False, "b": True, "c": False}  # c: 30% < 2 x hypot(0.2, 0.2)
    assert [r["provider"] for r in cmp["regressions"]] == ["b"]
    assert [r["provider"] for r in cmp["only_new"]] == ["new"]
    assert [r["provider"] for r in cmp["only_old"]] == ["gone"]
    assert regression_threshold(_row("x", 1.0, 0.0), _row("x", 1.0, 0.0)) == REGRESSION_FLOOR


def test_compare_lists_rows_that_cannot_be_compared():
    old = [_row("a", 1.0)]
    new = [dict(_row("a", 1.0), status="WRONG")]
    cmp = compare_records(new, old)
    assert not cmp["matched"] and not cmp["regressions"] and len(cmp["not_comparable"]) == 1




def test_compare_states_the_targets_of_an_old_file_without_intervals_beside_the_new_run():
    import pykernels
    from harness.bench.summary import target_changes

    spec = pykernels.get("fused_rope_attention")

    def att(provider, p50, **kw):
        return dict(_row(provider, p50, **kw), kernel="fused_rope_attention", family="prefill",
                    label="B=1 Sq=8192 causal=0")

    old = [att("kt_graph", 1.9), att("cudnn_alone", 2.0)]  # saved before interleaving
    new = [att("kt_graph", 1.9, ratios={"cudnn_alone": {"ratio": 0.95, "lo": 0.94,
                                                        "hi": 0.97}}),
           att("cudnn_alone", 2.0)]
    assert compare_records(new, old)["matched"]  # old rows compare by p50 as before
    (goal,) = [c for c in target_changes(spec, new, old) if c["target"] == "goal/cudnn_alone"]
    assert goal["old"] == "0.950; p50s, no interval: no verdict"
    assert goal["new"] == "0.950 [0.940, 0.970]; goal met, moonshot within noise"
