"""Pruners by name: ``get_pruner("wt")``. Extend with :func:`register_pruner`."""

from __future__ import annotations

from typing import Any

from .base import Pruner
from .ft import FTPruner
from .pfp import PFPPruner
from .sipp import SiPPPruner
from .wanda import WandaPruner
from .wt import WTPruner

#: registered pruner classes by (lower-case) name
PRUNERS: dict[str, type[Pruner]] = {
    "wt": WTPruner,
    "sipp": SiPPPruner,
    "ft": FTPruner,
    "pfp": PFPPruner,
    "wanda": WandaPruner,
}


def register_pruner(name: str, cls: type[Pruner], *, replace: bool = False) -> type[Pruner]:
    """Register ``cls`` (a :class:`Pruner` subclass) under ``name``; ValueError if the name is taken
    (unless ``replace``). Returns ``cls``, so it can also decorate a class via ``functools.partial``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Pruner)):
        raise TypeError(f"cls: expected a Pruner subclass, got {cls!r}")
    key = name.strip().lower()
    if key in PRUNERS and PRUNERS[key] is not cls and not replace:
        raise ValueError(f"name: a pruner {key!r} is already registered ({PRUNERS[key].__name__}); pass replace=True")
    PRUNERS[key] = cls
    return cls


def pruner_names() -> list[str]:
    """The registered names, in registration order."""
    return list(PRUNERS)


def get_pruner(name: str, **options: Any) -> Pruner:
    """A new pruner instance by name (case-insensitive); ``options`` go to its constructor.
    ValueError listing the valid names for an unknown one."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; valid names: {', '.join(PRUNERS)}")
    return PRUNERS[key](**options)
