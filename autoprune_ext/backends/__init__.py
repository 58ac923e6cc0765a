"""Backend registry: which implementation runs each ``torch.ops.autoprune`` op.

Three names: ``reference`` (pure PyTorch, always usable, the default), ``triton`` (fused Triton
kernels: CUDA tensors with a GPU driver, or CPU tensors under ``TRITON_INTERPRET=1``) and ``cpp``
(C++ CPU kernels and CUDA kernels). Choice, first match wins:

1. the innermost ``with autoprune_ext.backends.use(name):`` block;
2. the environment variable ``AUTOPRUNE_BACKEND=<name>``;
3. automatic, by the device of the tensors: the first usable backend in :data:`AUTO_ORDER`.

A backend chosen by name that cannot run on the tensors' device raises ``RuntimeError`` saying why;
automatic choice never fails, since the reference runs everywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

from .base import Backend

NAMES: tuple[str, ...] = ("reference", "triton", "cpp")

#: automatic choice per device type, most preferred first
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cpp", "reference"),
    "cpu": ("cpp", "reference"),
}

# name -> module that defines the backend (imported lazily: triton / the C++ build are optional)
_MODULES: dict[str, str] = {
    "reference": "autoprune_ext.backends.reference",
    "triton": "autoprune_ext.backends.triton",
    "cpp": "autoprune_ext.backends.cpp",
}
_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}
_availability: dict[tuple[str, str], tuple[bool, str]] = {}
_load_errors: dict[str, str] = {}
_local = threading.local()
_lock = threading.Lock()


def register(name: str, factory: Callable[[], Backend], module: str | None = None) -> None:
    """Register (or replace) a backend under ``name``; ``factory`` builds it on first use."""
    with _lock:
        _instances.pop(name, None)
        _load_errors.pop(name, None)
        _availability.clear()
        _factories[name] = factory
        if module is not None:
            _MODULES[name] = module



def _check_name(name: str) -> None:
    if name not in _MODULES and name not in _factories:
        raise ValueError(f"backend: expected one of {tuple(sorted(set(_MODULES) | set(_factories)))}, got {name!r}")


def get(name: str) -> Backend | None:
    """The backend object registered as ``name``, or ``None`` if its module cannot be loaded here."""
    _check_name(name)
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _load_errors:
            return None
        try:
            if name not in _factories:
                module = importlib.import_module(_MODULES[name])
                _factories[name] = module.make_backend
            _instances[name] = _factories[name]()
        except Exception as exc:  # an optional dependency is missing or broken: say why, never crash
            _load_errors[name] = f"{type(exc).__name__}: {exc}".strip()
            return None
        return _instances[name]


def availability(name: str, device_type: str) -> tuple[bool, str]:
    """``(usable, reason)`` for backend ``name`` on tensors of ``device_type`` (``"cpu"``, ``"cuda"``).

    Cached: ops consult it on every call. :func:`clear_cache` forgets it (after a build, say).
    """
    key = (name, device_type)
    if key not in _availability:
        _availability[key] = _availability_uncached(name, device_type)
    return _availability[key]


def clear_cache() -> None:
    """Forget cached availability answers and failed loads (e.g. after building an extension)."""
    with _lock:
        _availability.clear()
        _load_errors.clear()


def _availability_uncached(name: str, device_type: str) -> tuple[bool, str]:
    backend = get(name)
    if backend is None:
        return False, f"cannot be loaded ({_load_errors.get(name, 'unknown error')})"
    try:
        return backend.availability(device_type)
    except Exception as exc:
        return False, f"availability check failed ({type(exc).__name__}: {exc})"


def _device_types() -> list[str]:
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    return types


def available() -> list[str]:
    """Names of the backends usable on this machine (for at least one present device type)."""
    return [n for n in NAMES if any(availability(n, t)[0] for t in _device_types())]


def status() -> dict[str, dict[str, str]]:
    """For every backend and device type present: ``"ok: ..."`` or the reason it is not usable."""
    out: dict[str, dict[str, str]] = {}
    for n in NAMES:
        out[n] = {}
        for t in _device_types():
            ok, why = availability(n, t)
            out[n][t] = ("ok: " if ok else "unavailable: ") + why
    return out


def forced() -> str | None:
    """The backend name forced by :func:`use` or ``AUTOPRUNE_BACKEND``, if any."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("AUTOPRUNE_BACKEND", "").strip()
    return env or None


@contextlib.contextmanager
def use(name: str) -> Iterator[Backend]:
    """Run the ops inside this block on backend ``name`` (raises ``ValueError`` for unknown names)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        backend = get(name)
        if backend is None:
            raise RuntimeError(f"backend {name!r} cannot be loaded: {_load_errors.get(name)}")
        yield backend
    finally:
        stack.pop()


def select(device: torch.device) -> Backend:
    """The backend that runs ops on tensors of ``device`` right now."""
    name = forced()
    if name is not None:
        _check_name(name)
        ok, why = availability(name, device.type)
        if not ok:  # a cached "no" may predate a build that use()/the env var now allows: ask again
            _availability.pop((name, device.type), None)
            ok, why = availability(name, device.type)
        if not ok:
            raise RuntimeError(f"autoprune backend {name!r} cannot run on {device.type} tensors: {why}")
        backend = get(name)
        assert backend is not None
        return backend
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        if availability(candidate, device.type)[0]:
            backend = get(candidate)
            assert backend is not None
            return backend
    backend = get("reference")
    assert backend is not None
    return backend
