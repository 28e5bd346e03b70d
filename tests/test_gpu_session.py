"""benchmarks/gpu_session_kernels.sh's choice of the kernels max+kt serves, on the CPU: stand-ins
for tests/mojo/gpu_launch.mojo and gpu_bench.mojo print the verdict lines the real programs
print on a GPU, and the script must turn on exactly the candidates that passed the check and
were faster, time only those that passed, and release the serving run's wait files. A flag is
set in whichever kernels/*.mojo defines it, and a label never passes on another label's line
("tiled decode" on "dense tiled decode")."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCH = '''def main():
    print("tiled decode check: all PASS")
    print("max prefill (MAX kernel) bfloat16 FAIL")
    print("dense tiled decode check: all PASS")
    print("rms norm x2 check: all PASS")
'''
BENCH = '''from std.sys import argv
def main():
    for a in argv():
        print("arg", a)
    print("tiled decode faster: no (time over the kernel it replaces: 1.1)")
    print("dense tiled decode faster: yes (time over the kernel it replaces: 0.7)")
    print("rms norm x2 faster: yes (time over the kernel it replaces: 0.9)")
'''


def _copy_with_candidates_off(tmp_path) -> Path:
    """A copy of the repository with the candidates off, as a candidate is shipped."""
    copy = tmp_path / "repo"
    for item in ("harness", "pykernels", "kernels", "benchmarks", "scripts", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item)
    for file, names in (("paged_rope_attention", ("TILED_DECODE", "MAX_PREFILL")),
                        ("fused_rope_attention", ("DENSE_TILED_DECODE",)), ("rms_norm", ("RMS_NORM_LEAN",)),
                        ("rope", ("ROPE_TWIN",))):
        op = copy / "kernels" / f"{file}.mojo"
        text = op.read_text()
        for name in names:
            text = text.replace(f"\ncomptime {name} = True\n", f"\ncomptime {name} = False\n")
            assert f"\ncomptime {name} = False\n" in text, name
        op.write_text(text)
    return copy


def test_candidates_on_only_when_checked_and_faster(tmp_path):
    shipped = {f: f.read_text() for f in (REPO / "kernels").glob("*.mojo")}
    copy = _copy_with_candidates_off(tmp_path)
    # A candidate with digits in its name, which the script's grep and sed must take.
    norm = copy / "kernels" / "rms_norm.mojo"
    norm.write_text(norm.read_text() + "\ncomptime RMS_NORM_X2 = False\n")
    (copy / "tests" / "mojo").mkdir(parents=True)
    (copy / "tests" / "mojo" / "gpu_launch.mojo").write_text(LAUNCH)
    (copy / "tests" / "mojo" / "gpu_bench.mojo").write_text(BENCH)
    results = tmp_path / "session"
    env = dict(os.environ, RESULTS=str(results), VERIFY_KERNELS="none", BENCH_KERNELS="none",
               CANDIDATES="TILED_DECODE=tiled decode MAX_PREFILL=max prefill DENSE_TILED_DECODE=dense tiled decode "
                          "RMS_NORM_X2=rms norm x2",
               PYTHON=sys.executable)
    r = subprocess.run(["bash", "benchmarks/gpu_session_kernels.sh"], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    kernels = results / "src" / "kernels"
    op = (kernels / "paged_rope_attention.mojo").read_text()
    assert "\ncomptime TILED_DECODE = False\n" in op  # checked, not faster
    assert "\ncomptime MAX_PREFILL = False\n" in op
    assert "\ncomptime DENSE_TILED_DECODE = True\n" in (kernels / "fused_rope_attention.mojo").read_text()
    bench_args = [ln.split()[1] for ln in (results / "time" / "mojo" / "gpu_bench.log").read_text().splitlines()
                  if ln.startswith("arg ")]
    assert "\ncomptime RMS_NORM_X2 = True\n" in (kernels / "rms_norm.mojo").read_text()  # digits in a name
    # the failed candidate is not timed
    assert bench_args[1:] == ["TILED_DECODE", "DENSE_TILED_DECODE", "RMS_NORM_X2"]
    assert (results / "kernels_ready").read_text().split() == ["DENSE_TILED_DECODE", "RMS_NORM_X2"]
    assert (results / "verified").exists() and (results / "DONE").exists()
    # The repository's own kernels are untouched.
    assert {f: f.read_text() for f in (REPO / "kernels").glob("*.mojo")} == shipped


# gpu_kernels.sh's stand-in for the verify rule: check and time print every candidate's lines,
# verify writes the summary line of the test's choosing.
STAND_IN = r"""#!/usr/bin/env bash
mkdir -p "$RESULTS/mojo" "$RESULTS/verify"
case "$MOJO_RUNS" in
  *gpu_launch*) printf '%s check: all PASS\n' "rms norm lean" "rope twin" "dense tiled decode" >"$RESULTS/mojo/gpu_launch.log" ;;
  *gpu_bench*) printf '%s faster: yes\n' "rms norm lean" "rope twin" "dense tiled decode" >"$RESULTS/mojo/gpu_bench.log" ;;
esac
[ "$VERIFY_KERNELS" != none ] && echo "summary: $SUMMARY" >"$RESULTS/verify/gpu_verify.log"
echo done >"$RESULTS/DONE"
"""


def test_a_failed_verify_turns_off_only_the_flags_its_op_reaches(tmp_path):
    """rope.mojo (ROPE_TWIN) and fused_rope_attention.mojo (DENSE_TILED_DECODE) are imported by
    kt.paged_rope_attention, whose verify failed: both go off; RMS_NORM_LEAN (rms_norm.mojo, which
    that op does not import) stays on. With no summary line every flag goes off."""
    copy = _copy_with_candidates_off(tmp_path)
    (copy / "benchmarks" / "gpu_kernels.sh").write_text(STAND_IN)
    cands = "RMS_NORM_LEAN=rms norm lean ROPE_TWIN=rope twin DENSE_TILED_DECODE=dense tiled decode"
    for summary, on in (("mojo-check:skipped paged_rope_attention:FAIL(1) rms_norm:PASS rope:PASS",
                         ["RMS_NORM_LEAN"]),
                        ("mojo-check:skipped paged_rope_attention:PASS rms_norm:PASS rope:PASS",
                         ["RMS_NORM_LEAN", "ROPE_TWIN", "DENSE_TILED_DECODE"]),
                        ("", [])):
        results = tmp_path / f"session{len(on)}"
        env = dict(os.environ, RESULTS=str(results), CANDIDATES=cands, BENCH_KERNELS="none",
                   VERIFY_KERNELS="paged_rope_attention rms_norm rope", SUMMARY=summary)
        if not summary:
            (copy / "benchmarks" / "gpu_kernels.sh").write_text(STAND_IN.replace('echo "summary: $SUMMARY"', "true"))
        r = subprocess.run(["bash", "benchmarks/gpu_session_kernels.sh"], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (results / "verified").read_text().split() == (on or ["none"]), summary
        kernels = results / "src" / "kernels"
        assert ("\ncomptime ROPE_TWIN = True\n" in (kernels / "rope.mojo").read_text()) == ("ROPE_TWIN" in on)
