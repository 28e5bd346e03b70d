"""`python -m harness.serving.layers`: a served prefill's KT_CHECK=hidden prints set beside the
fp32 reference's per-layer statistics, prompt by prompt."""

import json

from harness.serving import layers


def line(attn, *values):
    label = "kt hidden attn" if attn else "kt hidden"
    return (f"{label} [layer, rows, max|h_last|, rms(h_last), ...] = "
            f"tensor([[{', '.join(f'{v:.4f}' for v in values)}]], dtype=f32, shape=[{len(values)}])")


def layer(k, rows, attn_rms, out_rms, out_max=9.0):
    return [line(True, k, rows, 9.0, attn_rms), line(False, k, rows, out_max, out_rms)]


REF = {"prompt_tokens": [3, 2],
       "hidden_attn": [[[1.0, 0.5], [2.0, 0.9]], [[1.0, 0.4], [3.0, 1.5]]],
       "hidden": [[[9.0, 0.6], [9.0, 1.0]], [[9.0, 0.5], [9.0, 2.0]]]}


def test_each_prompt_finds_its_prefill_and_the_first_step_off(tmp_path, capsys):
    log = ["INFO: warmup",
           line(True, 0, 3, 9, 9, 9, 9), line(False, 0, 3, 9, 9, 9, 9),  # two sequences: not a probe
           *layer(0, 3, 0.5, 0.6), *layer(1, 3, 0.9, 1.02),             # prompt 0: within 5 %
           *layer(0, 1, 5, 5), *layer(1, 1, 5, 5),                       # its decode steps
           *layer(0, 2, 0.4, 0.5), *layer(1, 2, 2.5, 2.6)]               # prompt 1: layer 1's attention
    (tmp_path / "s.log").write_text("\n".join(log) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(REF))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "prompt 0 (3 tokens): every layer within tol" in out
    assert "prompt 1 (2 tokens): first off at layer 1's attention" in out
    rows = layers.compare(layers.parse_log("\n".join(log)), REF, 0.05)
    assert rows[1]["rows"][1] == (1, 1.5, 2.5, 2.0, 2.6, 9.0, 9.0)
    # an MLP that departs after an attention that does not
    mlp_off = [*layer(0, 3, 0.5, 0.6), *layer(1, 3, 0.9, 1.5)]
    assert layers.compare(layers.parse_log("\n".join(mlp_off)), REF, 0.05)[0]["first_off"] == (1, "mlp")


def test_a_prompt_without_its_prefill_and_bad_input(tmp_path, capsys):
    (tmp_path / "s.log").write_text("\n".join(layer(0, 3, 0.5, 0.6)) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(REF))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "prompt 0 (3 tokens): no prefill of that many rows" in out  # layer 1's prints are missing
    (tmp_path / "empty.log").write_text("nothing\n")
    assert layers.main([str(tmp_path / "empty.log"), str(tmp_path / "r.json")]) == 2
    (tmp_path / "old.json").write_text(json.dumps({"steps": []}))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no 'kt hidden' lines" in err[0] and "no per-layer statistics" in err[1]
