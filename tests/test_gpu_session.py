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
'''
BENCH = '''from std.sys import argv
def main():
    for a in argv():
        print("arg", a)
    print("tiled decode faster: no (time over the kernel it replaces: 1.1)")
    print("dense tiled decode faster: yes (time over the kernel it replaces: 0.7)")
'''


def test_candidates_on_only_when_checked_and_faster(tmp_path):
    copy = tmp_path / "repo"
    for item in ("harness", "pykernels", "kernels", "benchmarks", "scripts", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item)
    op = copy / "kernels" / "paged_rope_attention.mojo"
    shipped = (REPO / "kernels" / "paged_rope_attention.mojo").read_text()
    # Both candidates off in the copy, as a candidate is shipped.
    op.write_text(shipped.replace("comptime TILED_DECODE = True", "comptime TILED_DECODE = False")
                  .replace("comptime MAX_PREFILL = True", "comptime MAX_PREFILL = False"))
    (copy / "tests" / "mojo").mkdir(parents=True)
    (copy / "tests" / "mojo" / "gpu_launch.mojo").write_text(LAUNCH)
    (copy / "tests" / "mojo" / "gpu_bench.mojo").write_text(BENCH)
    results = tmp_path / "session"
    env = dict(os.environ, RESULTS=str(results), VERIFY_KERNELS="none", BENCH_KERNELS="none",
               CANDIDATES="TILED_DECODE=tiled decode MAX_PREFILL=max prefill DENSE_TILED_DECODE=dense tiled decode",
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
    assert bench_args[1:] == ["TILED_DECODE", "DENSE_TILED_DECODE"]  # the failed candidate is not timed
    assert (results / "kernels_ready").read_text().split() == ["DENSE_TILED_DECODE"]
    assert (results / "verified").exists() and (results / "DONE").exists()
    # The repository's own kernels are untouched.
    assert (REPO / "kernels" / "paged_rope_attention.mojo").read_text() == shipped
    assert "\ncomptime DENSE_TILED_DECODE = False\n" in (REPO / "kernels" / "fused_rope_attention.mojo").read_text()
