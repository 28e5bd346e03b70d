"""Serving engines as plug-ins: one module per engine, each defining one `Engine` subclass.

`ENGINES` is discovered by scanning this package, so adding SGLang or TensorRT-LLM is one new
module here and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Engine, EngineNotFound, EngineOptions

ENGINES: dict[str, type[Engine]] = {}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name == "base":
        continue
    _m = importlib.import_module(f"{__name__}.{_mod.name}")
    for _obj in vars(_m).values():
        if isinstance(_obj, type) and issubclass(_obj, Engine) and _obj is not Engine and _obj.name:
            ENGINES[_obj.name] = _obj


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineNotFound(f"unknown engine {name!r} (known: {', '.join(sorted(ENGINES))})")
    return ENGINES[name]()


__all__ = ["ENGINES", "Engine", "EngineNotFound", "EngineOptions", "get_engine"]
