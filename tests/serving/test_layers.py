"""`python -m harness.serving.layers`: a served prefill's KT_CHECK=hidden prints set beside the
fp32 reference's per-layer statistics, prompt by prompt."""

import json

from harness.serving import layers

LABEL = "kt hidden [layer, rows, max|h_last|, rms(h_last), ...]"


def line(*values):
    return f"{LABEL} = tensor([[{', '.join(f'{v:.4f}' for v in values)}]], dtype=f32, shape=[{len(values)}])"


def test_each_prompt_finds_its_prefill_and_the_first_layer_off(tmp_path, capsys):
    ref = {"prompt_tokens": [3, 2], "hidden": [[[1.0, 0.5], [2.0, 1.0]], [[1.0, 0.4], [3.0, 2.0]]]}
    log = [
        "INFO: warmup",
        line(0, 3, 9, 9, 9, 9), line(1, 3, 9, 9, 9, 9),  # a batch of two sequences: not a probe
        line(0, 3, 1.0, 0.5), line(1, 3, 2.0, 1.02),      # prompt 0: within 5 %
        line(0, 1, 5, 5), line(1, 1, 5, 5),               # its decode steps
        line(0, 2, 1.0, 0.4), line(1, 2, 3.0, 2.5),       # prompt 1: layer 1 off
    ]
    (tmp_path / "s.log").write_text("\n".join(log) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(ref))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "prompt 0 (3 tokens): every layer within tol" in out
    assert "prompt 1 (2 tokens): first off at layer 1" in out
    rows = layers.compare(layers.parse_log("\n".join(log)), ref, 0.05)
    assert rows[1]["rows"][1] == (1, 3.0, 2.0, 3.0, 2.5)


def test_a_prompt_without_its_prefill_and_bad_input(tmp_path, capsys):
    ref = {"prompt_tokens": [4], "hidden": [[[1.0, 0.5]]]}
    (tmp_path / "s.log").write_text(line(0, 3, 1.0, 0.5) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(ref))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "r.json")]) == 0
    assert "prompt 0 (4 tokens): no prefill of that many rows" in capsys.readouterr().out
    (tmp_path / "empty.log").write_text("nothing\n")
    assert layers.main([str(tmp_path / "empty.log"), str(tmp_path / "r.json")]) == 2
    (tmp_path / "old.json").write_text(json.dumps({"steps": []}))
    assert layers.main([str(tmp_path / "s.log"), str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no 'kt hidden' lines" in err[0] and "no per-layer statistics" in err[1]
