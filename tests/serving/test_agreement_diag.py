"""benchmarks/serving/gpu_agreement_diag.sh on the CPU, with a stand-in for gpu_serve.sh: one
run per DIAG_RUNS line, in order, each with its own engines, serve-bench arguments and
variables, and every run's agreement verdicts collected in one status file."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "serving" / "gpu_agreement_diag.sh"

STAND_IN = """#!/usr/bin/env bash
mkdir -p "$RESULTS/serve"
{ echo "engines=$ENGINES"; echo "args=$SERVE_ARGS"; echo "kv=${KV_SHARE:-unset}"; echo "in=$IN_LEN"; } >"$RESULTS/seen.txt"
echo "${ENGINES%%,*} vs reference: AGREE (stand-in)" >"$RESULTS/serve/serve-bench.log"
echo 0 >"$RESULTS/DONE"
"""


def run(tmp_path, runs: str, **env):
    stand_in = tmp_path / "gpu_serve.sh"
    stand_in.write_text(STAND_IN)
    e = dict(os.environ, ROOT=str(tmp_path / "diag"), GPU_SERVE=str(stand_in), DIAG_RUNS=runs, **env)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=e)


def test_each_line_is_one_run_with_its_own_settings(tmp_path):
    r = run(tmp_path, "legacy|max|--engine-env max=MODULAR_USE_LEGACY_KV_CACHE=1\n"
                      "small|max+kt,max||KV_SHARE=0.05\n")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "diag"
    legacy = (root / "legacy" / "seen.txt").read_text().splitlines()
    assert legacy == ["engines=max", "args=--engine-env max=MODULAR_USE_LEGACY_KV_CACHE=1", "kv=unset", "in=512"]
    small = (root / "small" / "seen.txt").read_text().splitlines()
    assert small[0] == "engines=max+kt,max" and "kv=0.05" in small
    status = (root / "status.txt").read_text()
    assert "legacy: max vs reference: AGREE" in status and "small: max+kt vs reference: AGREE" in status
    assert status.index("legacy:") < status.index("small:")
    assert (root / "DONE").read_text().strip() == "done" and (tmp_path / "diag.tar.xz").is_file()


HIDDEN_STAND_IN = """#!/usr/bin/env bash
mkdir -p "$RESULTS/serve/logs" "$RESULTS/serve/reference"
echo '{"prompt_tokens": [2], "hidden_attn": [[[1.0, 0.5]]], "hidden": [[[1.0, 0.6]]]}' >"$RESULTS/serve/reference/probe.json"
{ echo "kt hidden attn [layer, rows, max|h_last|, rms(h_last), ...] = tensor([[0.0000, 2.0000, 1.0000, 0.5000]], dtype=f32, shape=[4])"
  echo "kt hidden [layer, rows, max|h_last|, rms(h_last), ...] = tensor([[0.0000, 2.0000, 7.0000, 3.0000]], dtype=f32, shape=[4])"
} >"$RESULTS/serve/logs/max_kt_none.log"
echo "plain log" >"$RESULTS/serve/logs/max.log"
echo "max+kt:none vs reference: DISAGREE (stand-in)" >"$RESULTS/serve/serve-bench.log"
echo 0 >"$RESULTS/DONE"
"""


def test_a_hidden_run_says_where_each_prefill_departs(tmp_path):
    stand_in = tmp_path / "gpu_serve.sh"
    stand_in.write_text(HIDDEN_STAND_IN)
    e = dict(os.environ, ROOT=str(tmp_path / "diag"), GPU_SERVE=str(stand_in),
             DIAG_RUNS="hid|max+kt:none|--engine-env max+kt:none=KT_CHECK=hidden\n")
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=e)
    assert r.returncode == 0, r.stderr
    status = (tmp_path / "diag" / "status.txt").read_text()
    assert "hid max_kt_none: prompt 0 (2 tokens): first off at layer 0's mlp" in status, status
    assert (tmp_path / "diag" / "hid" / "serve" / "logs" / "max_kt_none.layers.txt").is_file()
    assert not (tmp_path / "diag" / "hid" / "serve" / "logs" / "max.layers.txt").exists()


def test_no_runs_is_one_line_and_an_error(tmp_path):
    r = run(tmp_path, "")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "DIAG_RUNS" in r.stderr
