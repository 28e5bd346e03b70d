"""Each spec's Triton twin against its reference, by the k x baseline rule (imported by name:
pytest puts this folder on sys.path).

For every case and dtype: truth = the reference on fp64 copies of the inputs, baseline = the
reference on the inputs themselves (PyTorch in the kernel's own precision), and the twin must
satisfy max|twin - truth| <= k * max|baseline - truth| + eps(dtype) * max|truth|, the last
term being the one-ulp rounding any kernel pays on its largest output (flash-attention's
tests use k = 2 the same way). fp64 is the truth for fp32 too: the fp32 baseline is then
the fp32 rounding error, not zero.

On CPU the twins run under TRITON_INTERPRET=1, which Triton reads when `@triton.jit`
decorates a function, i.e. when `pykernels` is first imported. So test modules *register*
their cases here at collection (`register`: the golden cases in tests/test_triton_twins.py,
the extra ones in tests/test_<kernel>.py), and the first test that needs a result runs every
selected case in one child process started with the variable set (plus one BLAS/OpenMP
thread: on 2 cores numpy's spinning OpenBLAS threads and torch's OpenMP pool make a 64x128
interpreted tl.dot take 15 ms instead of 20 us). `conftest.py` tells `select` which cases
the session kept. GPU tests run the same cases compiled, in the test process (`check`).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import pykernels

DTYPES = ("float32", "bfloat16", "float16")
# case id -> {"kernel", "shape", "params", "why", "dtype"} for a twin check, or
# {"call": "module:function"} for a function run in the child that returns its own numbers
CASES: dict[str, dict] = {}
_SELECTED: set[str] | None = None


def register(kernel: str, cases, prefix: str) -> list[str]:
    """Register `cases` (harness.spec.Case, full shapes) of `kernel` in every dtype; returns
    their ids, `{kernel}-{prefix}{i}-{dtype}`, for `pytest.mark.parametrize`."""
    ids = []
    for i, case in enumerate(cases):
        for dt in DTYPES:
            cid = f"{kernel}-{prefix}{i}-{dt}"
            CASES[cid] = {"kernel": kernel, "shape": case.shape, "params": case.params,
                          "why": case.why, "dtype": dt}
            ids.append(cid)
    return ids


def extra_cases(kernel: str, cases):
    """Register a kernel's extra twin `cases` (`register`, prefix "extra") and make their two
    tests, interpreted and compiled on a GPU; a test module binds them to test_* names:
    `TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases(...)`."""
    ids = register(kernel, cases, "extra")

    @pytest.mark.parametrize("twin_case", ids)
    def test_twin_interpreted(twin_case):
        assert_interpreted(twin_case)

    @pytest.mark.gpu
    @pytest.mark.parametrize("twin_case", ids)
    def test_twin_cuda(twin_case):
        assert_compiled(twin_case)

    return ids, test_twin_interpreted, test_twin_cuda


def register_call(cid: str, target: str) -> str:
    """Register `target` ("module:function" of a test module) to run in the child."""
    CASES[cid] = {"call": target}
    return cid


def select(ids) -> None:
    """The registered cases this session runs (the others are left out of the child)."""
    global _SELECTED
    _SELECTED = {i for i in ids if i in CASES}


def why(cid: str) -> str:
    return CASES[cid].get("why", cid)


def check(cid: str, device: str, seed: int = 0) -> dict:
    """Run one case's twin, reference and fp64 truth; return the numbers the rule needs."""
    c = CASES[cid]
    spec = pykernels.get(c["kernel"])
    params = spec.full_params(c["params"])
    dt = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(seed)
    inputs = spec.make_inputs(c["shape"], params, dt, torch.device(device), gen)
    out = spec.triton(inputs, params)
    base = spec.reference(inputs, params)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    truth = spec.reference(wide, params)
    rows = []
    for arg, o, b, t in zip(spec.outputs, out, base, truth):
        t = t.cpu()
        rows.append({
            "name": arg.name,
            "dtype_ok": o.dtype == dt,
            "shape_ok": tuple(o.shape) == arg.concrete_shape(c["shape"]),
            "finite": bool(torch.isfinite(o).all()),
            "base_finite": bool(torch.isfinite(b).all()),
            "err": (o.cpu().double() - t).abs().max().item(),
            "base": (b.cpu().double() - t).abs().max().item(),
            "ulp": torch.finfo(dt).eps * t.abs().max().item(),
        })
    return {"k": spec.tolerance_k, "outputs": rows}


def assert_rule(result: dict, why: str) -> None:
    for r in result["outputs"]:
        assert r["dtype_ok"] and r["shape_ok"], f"{r['name']}: wrong dtype or shape ({why})"
        assert r["base_finite"], f"{r['name']}: the same-precision baseline overflowed ({why})"
        assert r["finite"], f"{r['name']}: NaN/Inf where the reference is finite ({why})"
        bound = result["k"] * r["base"] + r["ulp"]
        assert r["err"] <= bound, (f"{r['name']}: max error {r['err']:.3e} > {bound:.3e} = "
                                   f"{result['k']} x baseline {r['base']:.3e} + ulp {r['ulp']:.3e}"
                                   f" ({why})")


@functools.cache
def _interpreted_results() -> dict:
    """Every selected case's numbers from one interpreted child; {"child": error} if it died."""
    wanted = {k: v for k, v in CASES.items() if _SELECTED is None or k in _SELECTED}
    env = dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(wanted), env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"child": f"interpreter child failed:\n{proc.stderr[-4000:]}"}
    return json.loads(proc.stdout.splitlines()[-1])


def interpreted(cid: str) -> dict:
    """The numbers of case `cid` from the interpreted child (fails the test if it failed)."""
    results = _interpreted_results()
    if "child" in results:
        pytest.fail(results["child"])
    if cid not in results:
        pytest.fail(f"{cid} was not run by the interpreted child")
    if "error" in results[cid]:
        pytest.fail(results[cid]["error"])
    return results[cid]


def assert_interpreted(cid: str) -> None:
    """Case `cid` passes the rule under Triton's interpreter."""
    assert_rule(interpreted(cid), why(cid))


def assert_compiled(cid: str) -> None:
    """Case `cid` passes the rule with the twin compiled for the GPU (skips elsewhere)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the twins are interpreted, not compiled")
    assert_rule(check(cid, "cuda"), why(cid))


def _child_main() -> None:
    """Child process: every case it was given, one JSON line out."""
    torch.set_num_threads(1)
    cases = json.loads(sys.stdin.read())
    CASES.update(cases)
    results = {}
    for cid, c in cases.items():
        try:
            if "call" in c:
                module, fn = c["call"].split(":")
                results[cid] = getattr(importlib.import_module(module), fn)()
            else:
                results[cid] = check(cid, "cpu")
        except Exception as e:  # reported by the test of that case, not by the whole batch
            results[cid] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    _child_main()
