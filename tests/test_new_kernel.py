"""A new kernel touches its own files and nothing else: the throwaway kernel in
tests/new_kernel/ (y = x * x + x) is added to a copy of the repository, with one launch in
tests/mojo/gpu_launch.mojo, and is then picked up by `kt list`, `kt verify`, `kt microbench`,
benchmarks/gpu_run.sh's plan and the generic tests, with no other edit.

One small compile: `kt verify` builds the bf16 graph of the copy's package, which
`kt microbench`'s kt_graph then loads from MAX's cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
NEW = Path(__file__).resolve().parent / "new_kernel"
NAME = "square_plus"
OWN_FILES = {f"kernels/{NAME}.mojo", f"pykernels/{NAME}.py", f"benchmarks/{NAME}.toml",
             f"tests/test_{NAME}.py"}
LAUNCH = "tests/mojo/gpu_launch.mojo"
SKIP = shutil.ignore_patterns(".git", ".venv", ".venvs", "__pycache__", ".pytest_cache",
                              ".hypothesis", "*.egg-info", "results", "new_kernel")

pytestmark = pytest.mark.slow


def add_kernel(copy: Path) -> None:
    """What a kernel author does: four new files and one launch in gpu_launch.mojo."""
    for rel in OWN_FILES:
        shutil.copy(NEW / rel, copy / rel)
    launch = copy / LAUNCH
    src = launch.read_text()
    anchor = "def launch_all[dtype: DType](ctx: DeviceContext) raises:\n"
    assert anchor in src and "from kernels." in src
    src = src.replace("from kernels.", f"from kernels.{NAME} import GPU_BLOCK as SQP_BLOCK, "
                      f"_square_plus_gpu\nfrom kernels.", 1)
    src = src.replace(anchor, anchor + (
        "    var sq_x = ctx.enqueue_create_buffer[dtype](64)\n"
        "    var sq_y = ctx.enqueue_create_buffer[dtype](64)\n"
        "    ctx.enqueue_function[_square_plus_gpu[dtype]](\n"
        "        sq_y.unsafe_ptr(), sq_x.unsafe_ptr(), Int32(64), grid_dim=1, block_dim=SQP_BLOCK,\n"
        "    )\n"), 1)
    launch.write_text(src)


def changed_files(a: Path, b: Path) -> set[str]:
    """Files that differ between the trees `a` and `b` (added, removed or edited)."""
    def files(root):
        return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts}
    fa, fb = files(a), files(b)
    return {rel for rel in fa.keys() | fb.keys()
            if rel not in fa or rel not in fb or fa[rel].read_bytes() != fb[rel].read_bytes()}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("new_kernel")
    before, after = base / "before", base / "kt"
    shutil.copytree(REPO, before, ignore=SKIP)
    shutil.copytree(before, after)
    add_kernel(after)
    assert changed_files(before, after) == OWN_FILES | {LAUNCH}
    return after


def run(copy: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python *args` in the copy, importing the copy's harness and pykernels."""
    env = dict(os.environ, PYTHONPATH=str(copy), COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_kt_list_and_the_gpu_plan_pick_it_up(repo_copy):
    r = run(repo_copy, "-m", "harness", "list", "--names")
    assert r.returncode == 0, r.stderr
    assert NAME in r.stdout.split()
    plan = run(repo_copy, "-m", "harness.bench", "plan", "--device", "gpu")
    assert plan.returncode == 0, plan.stderr
    assert f"warm {NAME} kt_graph" in plan.stdout and f"time {NAME} 30" in plan.stdout


def test_kt_verify_and_kt_microbench_run_it(repo_copy, tmp_path):
    out = tmp_path / "verify.json"
    r = run(repo_copy, "-m", "harness", "verify", NAME, "--device", "cpu", "--dtype", "bf16",
            "--profile", "ci", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["kernel"] == NAME and result["failure"] is None
    assert result["stats"]["bfloat16"]["examples"] > 0
    assert any(k.startswith("triton:") for k in result["stats"]["bfloat16"]["worst"])
    saved = tmp_path / "bench.json"
    r = run(repo_copy, "-m", "harness", "microbench", NAME, "--device", "cpu",
            "--providers", "kt_graph,triton,torch_eager", "--save", str(saved))
    assert r.returncode == 0, r.stdout + r.stderr
    status = {row["provider"]: row["status"] for row in json.loads(saved.read_text())["rows"]}
    assert status == {"kt_graph": "ok", "triton": "ok", "torch_eager": "ok"}


def test_the_generic_tests_cover_it(repo_copy, tmp_path):
    report = tmp_path / "junit.xml"
    r = run(repo_copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
            "-k", NAME, f"--junitxml={report}", "tests/test_specs.py",
            "tests/test_triton_twins.py", "tests/test_verify.py",
            "tests/test_bench_families.py", f"tests/test_{NAME}.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    passed = {c.get("name") for c in cases if not list(c)}  # no failure/error/skipped child
    for generic in ("test_a_kernel_is_its_files_under_one_name",
                    "test_golden_cases_are_valid_and_bytes_count_every_tensor_once",
                    "test_same_precision_baseline_is_not_fp32_in_disguise",
                    "test_twin_interpreted", "test_drawn_cases_are_valid_for_the_spec",
                    "test_family_files_parse_and_every_shape_validates",
                    "test_warm_jobs_compile_kt_providers_and_the_files_own"):
        assert any(n.startswith(f"{generic}[") and NAME in n for n in passed), generic
    assert "test_reference_is_x_times_x_plus_x" in passed
