"""Each spec's Triton twin against its reference, by the k x baseline rule.

For every case and dtype: truth = the reference on fp64 copies of the inputs, baseline = the
reference on the inputs themselves (PyTorch in the kernel's own precision), and the twin must
satisfy max|twin - truth| <= k * max|baseline - truth| + eps(dtype) * max|truth|, the last
term being the one-ulp rounding any kernel pays on its largest output (flash-attention's
tests use k = 2 the same way). fp64 is the truth for fp32 too: the fp32 baseline is then
the fp32 rounding error, not zero.

On CPU the twins run under TRITON_INTERPRET=1, which Triton reads when `@triton.jit`
decorates a function, i.e. when `pykernels` is first imported. So the CPU cases run in one
child process started with the variable set (plus one BLAS/OpenMP thread: on 2 cores
numpy's spinning OpenBLAS threads and torch's OpenMP pool make a 64x128 interpreted tl.dot
take 15 ms instead of 20 us), and the parametrized tests check its per-case results.
The `gpu` tests run the same cases compiled, in this process.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import pykernels
from harness.spec import DTYPES, Case

# (kernel, shape, params, why) beyond the golden cases: paths the goldens leave cold.
EXTRA = (
    ("fused_rope_attention", {"B": 1, "Sq": 3, "cache": 600, "Hk": 1, "group": 2, "D": 64},
     {"causal": 1}, "Skv = 603 spans several KV tiles: the online-softmax rescale runs"),
    ("fused_rope_attention", {"B": 2, "Sq": 2, "cache": 300, "Hk": 2, "group": 1, "D": 32},
     {"causal": 0, "logits": "huge"}, "several KV tiles with logits about 150, non-causal"),
    ("fused_rope_attention", {"B": 1, "Sq": 300, "cache": 0, "Hk": 1, "group": 1, "D": 16},
     {"causal": 1}, "more query rows than one tile: later tiles start their causal loop late"),
    ("rope", {"B": 4, "S": 300, "Hk": 8, "group": 4, "D": 128},
     {"positions": "random", "theta": 500000.0, "factor": 8.0},
     "largest shape: many programs along tokens, the last one partial"),
    ("rms_norm", {"M": 509, "N": 1000}, {"input_scale": 4.0}, "many rows per program, prime M"),
)


def _cases() -> dict[str, tuple[str, Case]]:
    cases = {}
    for name, spec in pykernels.discover().items():
        for i, case in enumerate(spec.golden):
            cases[f"{name}-golden{i}"] = (name, case)
    for i, (name, free, params, why) in enumerate(EXTRA):
        cases[f"{name}-extra{i}"] = (name, Case(pykernels.get(name).complete(free), params, why))
    return cases


CASES = _cases()
IDS = [f"{cid}-{dt}" for cid in CASES for dt in DTYPES]


def check(cid: str, dtype: str, device: str, seed: int = 0) -> dict:
    """Run one case's twin, reference and fp64 truth; return the numbers the rule needs."""
    name, case = CASES[cid]
    spec = pykernels.get(name)
    params = spec.full_params(case.params)
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    inputs = spec.make_inputs(case.shape, params, dt, torch.device(device), gen)
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
            "shape_ok": tuple(o.shape) == arg.concrete_shape(case.shape),
            "finite": bool(torch.isfinite(o).all()),
            "base_finite": bool(torch.isfinite(b).all()),
            "err": (o.cpu().double() - t).abs().max().item(),
            "base": (b.cpu().double() - t).abs().max().item(),
            "ulp": torch.finfo(dt).eps * t.abs().max().item(),
        })
    return {"k": spec.tolerance_k, "outputs": rows}


def _assert_rule(result: dict, why: str) -> None:
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
    """Every case's numbers from one interpreted child; {"child": error} if it died."""
    env = dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        return {"child": f"interpreter child failed:\n{proc.stderr[-4000:]}"}
    return json.loads(proc.stdout.splitlines()[-1])


def _result(key: str) -> dict:
    results = _interpreted_results()
    if "child" in results:
        pytest.fail(results["child"])
    if "error" in results[key]:
        pytest.fail(results[key]["error"])
    return results[key]


@pytest.mark.parametrize("case_id", IDS)
def test_twin_interpreted(case_id: str) -> None:
    _assert_rule(_result(case_id), CASES[case_id.rsplit("-", 1)[0]][1].why)


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", IDS)
def test_twin_cuda(case_id: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the twins are interpreted, not compiled")
    cid, dtype = case_id.rsplit("-", 1)
    _assert_rule(check(cid, dtype, "cuda"), CASES[cid][1].why)


def test_interpreted_twins_catch_a_planted_bug() -> None:
    """The rule has teeth: a rotation by the wrong angle sign fails it."""
    result = _result("planted-rope-sign")
    assert result["err"] > result["k"] * result["base"] + result["ulp"]


def _planted_rope_sign() -> dict:
    spec = pykernels.get("rope")
    _, case = CASES["rope-golden3"]
    params = spec.full_params(case.params)
    inputs = spec.make_inputs(case.shape, params, torch.bfloat16, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    flipped = dict(inputs, positions=-inputs["positions"])
    out = spec.triton(flipped, params)[0]
    base = spec.reference(inputs, params)[0]
    truth = spec.reference({k: v.double() if v.is_floating_point() else v
                            for k, v in inputs.items()}, params)[0]
    return {"k": spec.tolerance_k, "err": (out.double() - truth).abs().max().item(),
            "base": (base.double() - truth).abs().max().item(),
            "ulp": torch.finfo(torch.bfloat16).eps * truth.abs().max().item()}


def _child_main() -> None:
    """Child process: every case and dtype under the interpreter, one JSON line out."""
    torch.set_num_threads(1)
    results = {}
    for case_id in IDS:
        cid, dtype = case_id.rsplit("-", 1)
        try:
            results[case_id] = check(cid, dtype, "cpu")
        except Exception as e:  # reported by the test of that case, not by the whole batch
            results[case_id] = {"error": f"{type(e).__name__}: {e}"}
    results["planted-rope-sign"] = _planted_rope_sign()
    print(json.dumps(results))


if __name__ == "__main__":
    _child_main()
