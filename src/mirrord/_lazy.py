"""Names of a package imported from its modules on first use (PEP 562 `__getattr__`).

Owns: `lazy_names`, which a package's `__init__` uses so that importing the package (or one
name of it) loads only the module that defines the name asked for: `mirrord run` must not pay
for the daemon's event-loop machinery or the layer's settings on every start.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str, where: Mapping[str, str], names: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's `__getattr__` and `__dir__`: `where` maps each name to the module of
    `package` that defines it (`"_client"` for `package._client`); a name found is kept in the
    package's namespace, so it is looked up once; `names` is what `dir()` lists."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return list(names)

    return __getattr__, __dir__
