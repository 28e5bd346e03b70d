"""One spec module per kernel; each exports `SPEC` (a `harness.spec.KernelSpec`).

Specs are discovered by scanning this package, so adding a kernel touches no shared list.
Modules whose name starts with `_` are helpers (`_common.py`), not kernels.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from harness.spec import KernelSpec


@cache
def discover() -> dict[str, KernelSpec]:
    """Every spec in this package, by kernel name, in name order."""
    specs: dict[str, KernelSpec] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, KernelSpec):
            specs[spec.name] = spec
    return dict(sorted(specs.items()))


def get(name: str) -> KernelSpec:
    """The spec called `name`; KeyError naming the known kernels otherwise."""
    specs = discover()
    if name not in specs:
        raise KeyError(f"unknown kernel {name!r} (known: {', '.join(specs) or 'none'})")
    return specs[name]
