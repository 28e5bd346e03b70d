"""The fp32 reference of `kt serve-bench`'s agreement check: greedy texts compared with the
reference's top-k steps (near-tie aware), the verdict when stock MAX itself disagrees with the
reference, and a reference that cannot run (a warning, not a failed run)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.serving import agreement
from harness.serving.config import BenchConfig, RunFailed
from harness.serving.checks import REFERENCE
from harness.serving.runner import Bench
from serving_helpers import engine_python

REPO = Path(__file__).resolve().parents[2]

# Two prompts, three steps each: " a" then a near-tie (" b" -0.1 vs " c" -0.105), then " d";
# the second prompt's second step is a clear choice (" y" -0.01 vs " z" -4.6).
STEPS = [
    [{" a": -0.01, " x": -5.0}, {" b": -0.1, " c": -0.105, " e": -3.0}, {" d": -0.2, " f": -2.0}],
    [{" w": -0.02, " v": -4.0}, {" y": -0.01, " z": -4.6}, {" u": -0.3, " t": -1.4}],
]


def test_texts_on_the_reference_tokens_are_identical():
    a = agreement.compare_text_to_steps(STEPS, [" a b d", " w y u"])
    assert a.ok and a.identical == 2 and a.near_tie_flips == 0 and a.steps_compared == 6
    assert a.mode != agreement.LOGPROBS and "2/2 greedy completions identical" in a.summary()


def test_a_flip_to_a_near_tie_token_agrees_and_a_flip_past_tol_does_not():
    flipped = [" a c g", " w y u"]  # " c" is 0.005 nats below " b": past the flip the texts may differ
    a = agreement.compare_text_to_steps(STEPS, flipped, tol=1e-2)
    assert a.ok and a.near_tie_flips == 1 and a.identical == 1
    strict = agreement.compare_text_to_steps(STEPS, flipped, tol=1e-3)
    assert not strict.ok and strict.mismatches == ["prompt 0 step 1: ' b' vs ' c g'"]


def test_a_token_far_below_the_choice_or_outside_the_top_k_is_a_mismatch():
    a = agreement.compare_text_to_steps(STEPS, [" a b d", " w z u"], tol=1.0)  # " z" is 4.59 nats below
    assert not a.ok and a.identical == 1 and a.mismatches == ["prompt 1 step 1: ' y' vs ' z u'"]
    b = agreement.compare_text_to_steps(STEPS, [" a kt80906 kt80906", " w y u"], tol=1.0)
    assert not b.ok and "prompt 0 step 1" in b.mismatches[0]


def test_a_text_shorter_or_longer_than_the_steps_is_a_mismatch():
    a = agreement.compare_text_to_steps(STEPS, [" a b", " w y u more"])
    assert not a.ok and a.identical == 0
    assert a.mismatches == ["prompt 0 step 2: ' d' vs ''", "prompt 1: text goes on after 3 steps: ' more'"]


def test_the_stock_text_decides_where_single_token_texts_do_not_add_up():
    """A character split over two byte tokens: each decodes alone to U+FFFD, the whole text to
    the character. The stock's whole text is identical; a text leaving the walk there is not."""
    steps = [[{"\ufffd": -0.1, " q": -3.0}, {"\ufffd": -0.2, " r": -3.0}]]
    assert agreement.compare_text_to_steps(steps, ["é"], stock_texts=["é"]).identical == 1
    assert not agreement.compare_text_to_steps(steps, ["é"], stock_texts=["\ufffd\ufffd"]).ok


def test_the_walk_follows_the_greedy_token_where_alike_texts_collapsed():
    """Byte tokens all read U+FFFD and collapse to the least likely of them, as the servers key
    logprobs: the step's first key is then another token, and the walk takes the greedy one."""
    steps = [[{" compared": -1.19, "\ufffd": -3.51}, {" q": -0.1, " r": -3.0}]]
    greedy = [[["\ufffd", -0.42], [" q", -0.1]]]
    assert agreement.compare_text_to_steps(steps, ["\ufffd q"], greedy=greedy).identical == 1
    assert not agreement.compare_text_to_steps(steps, ["\ufffd q"]).ok


def test_a_token_rendered_differently_is_the_same_token_when_its_logprob_is():
    """A byte of a partial UTF-8 character: MAX (and the reference) key it U+FFFD, vLLM '' (held
    back) or the completed character; a special token: '' skipped, or written out."""
    ref = [[{"\ufffd": -0.1, " q": -3.0}, {"": -0.2, " r": -3.0}, {" s": -0.3, " t": -2.0}]]
    vllm = [[{"": -0.1001, " q": -3.0}, {"<|eot_id|>": -0.2, " r": -3.0}, {" s": -0.3, " t": -2.0}]]
    a = agreement.compare(ref, vllm)
    assert a.ok and a.identical == 1 and a.max_logprob_diff == pytest.approx(0.0)
    off = [[{"": -0.5, " q": -3.0}, *vllm[0][1:]]]  # same rendering question, another logprob
    assert agreement.compare(ref, off).mismatches == ["prompt 0 step 0: '\ufffd' vs ''"]
    listed = [[{" q": -0.1, "\ufffd": -3.0}, *vllm[0][1:]]]  # " q" is another token of the ref's list
    assert not agreement.compare(ref, listed).ok


def test_logprobs_far_below_the_choice_are_not_compared():
    """The H200 probes of the 1B random model: the same tokens, runners-up 400 nats down and
    3.6 nats apart there (bf16 logits in the hundreds); a difference near the top still counts."""
    ref = [[{" dist": 0.0, " kt84974": -407.99, " kt101856": -409.13}]]
    served = [[{" dist": 0.0, " kt84974": -404.34, " kt101856": -409.5}]]
    a = agreement.compare(ref, served, tol=1.0)
    assert a.ok and a.identical == 1 and a.max_logprob_diff == 0.0
    near = [[{" dist": -0.05, " kt84974": -3.0}]]
    assert not agreement.compare([[{" dist": -0.05, " kt84974": -6.6}]], near, tol=1.0).ok


def test_probes_use_the_stock_steps_when_only_the_stock_served_logprobs():
    ref = {"steps": STEPS, "texts": [" a b d", " w y u"]}
    texts_only = {"texts": [" a c g", " w y u"]}
    a = agreement.compare_probes(ref, texts_only, tol=1e-2)
    assert a.ok and a.near_tie_flips == 1
    assert not agreement.compare_probes({"texts": ref["texts"]}, texts_only).ok  # no steps: any difference


def finish(tmp_path: Path, probes: dict, ref: dict) -> tuple[Bench, dict, str]:
    """Bench.finish over given probes and reference probe (no engine ran: 'no load point ran'
    is always a problem, so it raises RunFailed)."""
    bench = Bench(BenchConfig(model=tmp_path, runs=[], out=tmp_path / "out"))
    bench.probes = probes
    bench.ref_probe = ref
    bench.reference = {"device": "cpu", "dtype": "float32", "transformers": "5.12.1"}
    with pytest.raises(RunFailed):
        bench.finish(None)
    return bench, json.loads((tmp_path / "out" / "agreement.json").read_text()), \
        (tmp_path / "out" / "report.md").read_text()


NAN_TEXTS = [" kt80906 kt80906 kt80906", " kt80906 kt80906 kt80906"]  # prompt-independent: broken


def test_max_kt_passes_where_stock_max_disagrees_with_the_reference(tmp_path):
    ref = {"steps": STEPS, "texts": [" a b d", " w y u"]}
    bench, checks, report = finish(tmp_path, {"max": {"texts": NAN_TEXTS},
                                              "max+kt:rms_norm": {"texts": [" a b d", " w y u"]}}, ref)
    assert not checks["max vs reference"]["ok"] and checks["max+kt:rms_norm vs reference"]["ok"]
    waived = checks["max+kt:rms_norm vs max"]
    assert not waived["ok"] and waived["waived"]
    assert bench.problems == ["no load point ran"]
    assert report.count("stock MAX disagreed with the fp32 reference") == 1
    assert "- reference: fp32, transformers 5.12.1 on cpu" in report


def test_max_kt_fails_where_stock_max_agrees_with_the_reference(tmp_path):
    ref = {"steps": STEPS, "texts": [" a b d", " w y u"]}
    bench, checks, report = finish(tmp_path, {"max": {"texts": [" a b d", " w y u"]},
                                              "max+kt": {"texts": NAN_TEXTS}}, ref)
    assert checks["max vs reference"]["ok"] and not checks["max+kt vs reference"]["ok"]
    assert "waived" not in checks["max+kt vs max"]
    assert bench.problems[0].startswith("max+kt disagrees with max")
    assert "stock MAX disagreed" not in report


@pytest.mark.slow
def test_a_model_folder_without_weights_is_one_line_and_exit_2(tmp_path, tiny_model):
    python = engine_python("max")
    model = tmp_path / "noweights"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "prompts.json").write_text(json.dumps(["hello there"]))
    r = subprocess.run([str(python), str(REFERENCE), "--model", str(model), "--prompts", str(tmp_path / "prompts.json"),
                        "--out", str(tmp_path / "probe.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"hf_reference: cannot load {model}")
    assert "Traceback" not in r.stderr and not (tmp_path / "probe.json").exists()


@pytest.mark.slow
def test_a_broken_reference_is_a_warning_not_a_failed_run(tmp_path, tiny_model, fake_python):
    """Stand-in engines serve; the reference runs for real, under MAX's Python, on a model folder
    without weights: it fails, the run does not, and the report says why there is no reference."""
    real = engine_python("max")
    model = tmp_path / "noweights"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    shim = tmp_path / "python"  # the fake server, except for the reference script
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "{REFERENCE}" ]; then exec "{real}" "$@"; fi\nexec "{fake_python}" "$@"\n')
    shim.chmod(0o755)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(model),
                        "--engines", "max,max+kt", "--python", f"max={shim}", "--num-prompts", "1",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference: exit code 2: hf_reference: cannot load" in r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["reference"]["error"].startswith("exit code 2") and run["problems"] == []
    checks = json.loads((out / "agreement.json").read_text())
    assert list(checks) == ["max+kt vs max"] and checks["max+kt vs max"]["ok"]
    assert "- reference: none, its probe failed (exit code 2" in (out / "report.md").read_text()


@pytest.mark.slow
def test_the_reference_records_each_layers_last_row_at_prefill(tmp_path, tiny_model):
    """hidden[p][l] / hidden_attn[p][l]: [max |h|, RMS] of the residual stream at prompt p's last
    token after decoder layer l / after its attention, one entry per layer (what KT_CHECK=hidden
    prints of a served prefill), and it depends on the prompt."""
    python = engine_python("max")
    (tmp_path / "prompts.json").write_text(json.dumps(["hello there", "a longer prompt than that one"]))
    r = subprocess.run([str(python), str(REFERENCE), "--model", str(tiny_model), "--prompts",
                        str(tmp_path / "prompts.json"), "--out", str(tmp_path / "probe.json"), "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert [len(h) for h in probe["hidden"]] == [len(h) for h in probe["hidden_attn"]] == [layers, layers]
    assert all(0 < rms <= peak for h in probe["hidden"] + probe["hidden_attn"] for peak, rms in h)
    assert probe["hidden"][0] != probe["hidden"][1]
    assert probe["prompt_tokens"][1] > probe["prompt_tokens"][0] >= 2  # BOS and the words
