"""Backend selection: automatic by device, AUTOPRUNE_BACKEND, use(), and why a backend is unusable."""

from __future__ import annotations

import pytest
import torch

from autoprune_ext import backends
from autoprune_ext.backends.base import Backend
from autoprune_ext.backends.reference import ReferenceBackend


class _Counting(ReferenceBackend):
    name = "counting"
    calls = 0

    def apply_mask(self, weight, aux):
        type(self).calls += 1
        return super().apply_mask(weight, aux)


class _Nowhere(ReferenceBackend):
    name = "nowhere"

    def availability(self, device_type):
        return False, "needs hardware this machine lacks"


@pytest.fixture
def extra_backends():
    backends.register("counting", _Counting)
    backends.register("nowhere", _Nowhere)
    yield
    for n in ("counting", "nowhere"):
        backends._factories.pop(n, None)
        backends._instances.pop(n, None)
    backends.clear_cache()


def _call() -> torch.Tensor:
    return torch.ops.autoprune.apply_mask(torch.randn(3), torch.randn(3), "softplus", "sign", 0.1)


def test_reference_is_always_available():
    assert "reference" in backends.available()
    assert backends.status()["reference"]["cpu"].startswith("ok")
    assert set(backends.status()) == set(backends.NAMES)


def test_automatic_choice_is_usable(monkeypatch):
    monkeypatch.delenv("AUTOPRUNE_BACKEND", raising=False)
    chosen = backends.select(torch.device("cpu"))
    assert chosen.name in backends.AUTO_ORDER["cpu"]
    assert backends.availability(chosen.name, "cpu")[0]


def test_use_context_manager_routes_ops(extra_backends):
    _Counting.calls = 0
    with backends.use("counting"):
        _call()
        with backends.use("reference"):
            _call()
        _call()
    _call()
    assert _Counting.calls == 2


def test_environment_variable(extra_backends, monkeypatch):
    _Counting.calls = 0
    monkeypatch.setenv("AUTOPRUNE_BACKEND", "counting")
    _call()
    assert _Counting.calls == 1
    with backends.use("reference"):  # the context manager wins over the environment
        _call()
    assert _Counting.calls == 1


def test_unknown_name():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with backends.use("cuda-magic"):
            pass


def test_forced_unusable_backend_says_why(extra_backends):
    with backends.use("nowhere"):
        with pytest.raises(RuntimeError, match="'nowhere' cannot run on cpu tensors: needs hardware"):
            _call()


def test_load_failure_is_reported_not_raised(monkeypatch):
    def broken() -> Backend:
        raise ImportError("libfoo.so missing")

    backends.register("broken", broken)
    try:
        ok, why = backends.availability("broken", "cpu")
        assert not ok and "libfoo.so missing" in why
        assert backends.get("broken") is None
    finally:
        backends._factories.pop("broken", None)
        backends.clear_cache()


def test_every_backend_implements_every_op():
    ops = ("apply_mask", "mask_backward", "aux_adam_step_", "aux_adam_step_multi_", "masked_linear",
           "masked_linear_backward")
    for name in backends.NAMES:
        b = backends.get(name)
        if b is None:
            continue
        for op in ops:
            assert callable(getattr(b, op)), (name, op)
        for op in ("apply_mask", "mask_backward", "aux_adam_step_"):
            assert getattr(type(b), op) is not getattr(Backend, op), f"{name} lacks the primitive {op}"


def test_backward_on_another_thread_keeps_the_forced_backend(extra_backends):
    """Autograd may run backward on its own threads; the backend forced in forward must still apply."""
    import threading

    seen = []

    class Recording(_Counting):
        def mask_backward(self, *args):
            seen.append(threading.current_thread().name)
            return super().mask_backward(*args)

    backends.register("counting", Recording)
    w = torch.randn(4, requires_grad=True)
    with backends.use("counting"):
        t = torch.ops.autoprune.apply_mask(w, torch.randn(4), "softplus", "sign", 0.1)
    worker = threading.Thread(target=lambda: t.sum().backward(), name="autograd-like")
    worker.start()
    worker.join()
    assert seen == ["autograd-like"] and w.grad is not None
