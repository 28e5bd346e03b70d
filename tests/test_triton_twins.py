"""Every spec's Triton twin on every golden case and dtype, by the k x baseline rule
(`twins.py` says how: interpreted in one child process on the CPU, compiled on a GPU).
A kernel's extra twin cases are in its tests/test_<kernel>.py."""

from __future__ import annotations

import pytest

import pykernels
import twins

GOLDEN = [cid for name, spec in pykernels.discover().items()
          for cid in twins.register(name, spec.golden, "golden")]


@pytest.mark.parametrize("twin_case", GOLDEN)
def test_twin_interpreted(twin_case: str) -> None:
    twins.assert_interpreted(twin_case)


@pytest.mark.gpu
@pytest.mark.parametrize("twin_case", GOLDEN)
def test_twin_cuda(twin_case: str) -> None:
    twins.assert_compiled(twin_case)
