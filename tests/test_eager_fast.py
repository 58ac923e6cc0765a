"""The op layer's eager fast path (``ops.eager_fast``) against the registered ops.

Plain eager calls of the functional API and of ``AuxAdam`` skip the custom ops' Python dispatch
layers. These tests pin that the fast path is taken when it may be, is not taken when the dispatcher
must see the op, and gives the op's results bit for bit: outputs, every gradient, in-place state,
version counters and error messages.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import autoprune_ext as ap
from autoprune_ext import backends
from autoprune_ext import functional as apf
from autoprune_ext import ops
from autoprune_ext.optim import AuxAdam

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=backends.NAMES)
def backend(request):
    ok, why = backends.availability(request.param, DEVICE)
    if not ok:
        pytest.skip(f"backend {request.param} unavailable on {DEVICE}: {why}")
    with backends.use(request.param):
        yield request.param


def _registered_ops_called(fn) -> set[str]:
    """Names of the ``autoprune::`` custom ops the dispatcher ran during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("autoprune::")}


def _functional_cases():
    w = torch.randn(7, 5, dtype=torch.float64, device=DEVICE)
    m = torch.randn(7, 5, dtype=torch.float64, device=DEVICE)
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    b = torch.randn(7, dtype=torch.float64, device=DEVICE)
    return {
        "apply_mask": ((w, m), lambda w, m: apf.apply_mask(w, m, surrogate="sigmoid", rule="chain")),
        "masked_linear": ((x, w, m, b), lambda x, w, m, b: apf.masked_linear(x, w, m, b)),
        "masked_linear_unit": ((x, w, m[:, 0].contiguous()), lambda x, w, m: apf.masked_linear(x, w, m)),
        "apply_nm_mask": ((w[:, :4].contiguous(), m[:, :4].contiguous()),
                          lambda w, m: apf.apply_nm_mask(w, m, 2, 4)),
        "masked_conv2d": ((torch.randn(2, 3, 6, 6, dtype=torch.float64, device=DEVICE),
                           torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE),
                           torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)),
                          lambda x, w, m: apf.masked_conv2d(x, w, m, padding=1)),
    }


def _run(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", list(_functional_cases()))
def test_fast_path_equals_registered_op(backend, case, monkeypatch):
    inputs, fn = _functional_cases()[case]
    out_fast, grads_fast = _run(fn, inputs)
    assert not _registered_ops_called(lambda: _run(fn, inputs)), "the eager call should skip the custom ops"
    monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", "0")
    assert _registered_ops_called(lambda: _run(fn, inputs)), "AUTOPRUNE_EAGER_FAST=0 should use the ops"
    out_op, grads_op = _run(fn, inputs)
    assert torch.equal(out_fast, out_op)
    for g_fast, g_op in zip(grads_fast, grads_op):
        assert g_fast is not None and torch.equal(g_fast, g_op)


def test_frozen_inputs_get_no_gradient(backend):
    w = torch.randn(6, 4, requires_grad=True)
    m = torch.randn(6, 4)  # frozen aux
    x = torch.randn(3, 4)
    apf.masked_linear(x, w, m).sum().backward()
    assert w.grad is not None and m.grad is None and x.grad is None


def _adam_state(seed: int):
    g = torch.Generator().manual_seed(seed)
    aux = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    m1 = [torch.rand(a.shape, generator=g, dtype=torch.float64) for a in aux]
    m2 = [torch.rand(a.shape, generator=g, dtype=torch.float64) for a in aux]
    grads = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in aux]
    weights = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in aux]
    return aux, m1, m2, grads, weights


@pytest.mark.parametrize("multi", [True, False])
def test_adam_fast_path_equals_registered_op_and_bumps_versions(backend, multi, monkeypatch):
    results = []
    for fast in ("1", "0"):
        monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
        aux, m1, m2, grads, weights = _adam_state(0)
        before = [t._version for t in (*aux, *m1, *m2)]

        def step():
            if multi:
                ops.call_aux_adam_step_multi_(aux, m1, m2, grads, weights, [3, 1], [0.5, 0.25], 1e-2, 0.9, 0.99,
                                              1e-8, 0.1, "softplus", 0.1)
            else:
                for i in range(2):
                    ops.call_aux_adam_step_(aux[i], m1[i], m2[i], grads[i], weights[i], 3, 1e-2, 0.9, 0.99, 1e-8,
                                            0.5, 0.1, "softplus", 0.1)

        called = _registered_ops_called(step)
        assert bool(called) == (fast == "0"), called
        assert all(t._version > v for t, v in zip((*aux, *m1, *m2), before)), "in-place writes must bump versions"
        results.append([t.clone() for t in (*aux, *m1, *m2)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_in_place_aux_step_is_seen_by_autograd(backend):
    """A step between forward and backward invalidates the saved aux, as the registered op does."""
    model = ap.convert(torch.nn.Linear(4, 3))
    opt = AuxAdam.from_model(model, lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    out = model(torch.randn(2, 4)).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_errors_are_the_registered_ops(backend, monkeypatch):
    nan_aux = torch.randn(5, 4)
    nan_aux[1, 1] = float("nan")
    bad = [
        lambda: apf.masked_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 4), torch.randn(4)),
        # two errors at once: the same one wins on both paths
        lambda: apf.masked_linear(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4), nan_aux),
        lambda: apf.apply_mask(torch.randn(5, 4), nan_aux, surrogate="nope"),
        lambda: ops.call_aux_adam_step_multi_([torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [None], [None],
                                              [1.0], [0.0], 1e-2, 0.9, 0.99, 1e-8, 0.0, "softplus", 0.1),
        lambda: apf.apply_mask(torch.randn(5, 4), torch.randn(4, 5)),
        lambda: ops.call_aux_adam_step_multi_([torch.randn(3)], [torch.zeros(3)], [torch.zeros(2)], [None], [None],
                                              [1], [0.0], 1e-2, 0.9, 0.99, 1e-8, 0.0, "softplus", 0.1),
    ]
    for call in bad:
        monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", "1")
        with pytest.raises((TypeError, ValueError, RuntimeError)) as fast:
            call()
        monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", "0")
        with pytest.raises((TypeError, ValueError, RuntimeError)) as op:
            call()
        assert (type(fast.value), str(fast.value)) == (type(op.value), str(op.value))


@pytest.mark.parametrize("fast", ["1", "0"])
def test_higher_order_gradients_are_refused_not_wrong(backend, fast, monkeypatch):
    """The mask ops have no second derivative: a Hessian or a grad of a grad fails on both paths
    (never an all-zero or partial answer); nm_scores' straight-through backward is differentiable."""
    monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.autograd.functional.hessian(lambda w: apf.apply_mask(w, m.detach()).pow(2).sum(), w)
    for f in (lambda: apf.apply_mask(w, m), lambda: apf.masked_linear(x, w, m)):
        (gw,) = torch.autograd.grad(f().pow(2).sum(), w, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gw.sum() + w.sum(), w)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(apf.nm_scores(a, 2, 4).pow(2).sum(), a, create_graph=True)
    (gga,) = torch.autograd.grad(ga.sum(), a)
    assert torch.equal(gga, torch.full_like(a, 2.0))


class _Names(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_transforms_see_the_registered_op():
    w, m = torch.randn(4, 3), torch.randn(4, 3)
    with _Names() as mode:
        assert not ops.eager_fast(w, m)
        apf.apply_mask(w, m)
    assert any(n.startswith("autoprune.apply_mask") for n in mode.names), mode.names

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = apf.masked_linear(torch.empty(2, 3), torch.empty(4, 3), torch.empty(4, 3))
    assert t.shape == (2, 4)

    assert not ops.eager_fast(torch.empty(2, device="meta"))
    seen = []

    def inside_transform(w):  # the registered ops do not support functorch either; only the choice
        seen.append(ops.eager_fast(w, m))
        return w.sum()

    torch.func.grad(inside_transform)(w)
    assert seen == [False]

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(w, m):
        return apf.apply_mask(w, m) * 2

    assert torch.equal(compiled(w, m), apf.apply_mask(w, m) * 2)


@pytest.mark.parametrize("aux_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("unit", [False, True])
def test_finiteness_test_of_aux_on_every_path(backend, aux_dtype, unit, monkeypatch):
    """The functional API refuses a NaN/inf aux wherever it sits (the cpp backend tests it inside
    its apply_mask kernel: chunk and block boundaries, the tail), and accepts huge finite values."""
    # cpp: 70,000 entries, more than two parallel chunks of its kernels; the others test in a
    # separate pass (small shapes: Triton runs through its interpreter here)
    rows, cols = (70, 1000) if backend == "cpp" else (7, 13)
    w = torch.randn(rows, cols)
    x = torch.randn(3, cols)
    base = torch.randn(rows if unit else (rows, cols), dtype=torch.float64).to(aux_dtype)
    top = float(torch.finfo(aux_dtype).max)
    calls = [lambda m: apf.apply_mask(w, m), lambda m: apf.masked_linear(x, w, m)]
    ok = base.clone()
    ok.view(-1)[0], ok.view(-1)[-1] = top, -top
    for call in calls:
        call(ok)
    positions = [0, rows - 1] if unit else [0, 511, 512, 32767, 32768, 65536, rows * cols - 1]
    positions = [p for p in positions if p < rows * (1 if unit else cols)]
    for pos in positions:
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = base.clone()
            bad.view(-1)[pos] = value
            for fast in ("1", "0"):
                monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
                for call in calls:
                    with pytest.raises(ValueError, match=r"^aux: expected finite values, found NaN or inf$"):
                        call(bad)
            monkeypatch.setenv("AUTOPRUNE_CHECK_FINITE", "0")
            for call in calls:
                call(bad)  # the test is off: the raw op's rule applies (NaN and -inf pruned)
            monkeypatch.delenv("AUTOPRUNE_CHECK_FINITE")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unit", [False, True])
def test_cpp_masked_linear_is_one_native_node(dtype, unit, monkeypatch):
    """With the cpp backend on CPU, the eager masked_linear is one C++ autograd node (no Python frame in
    forward or backward) that gives the Python ``autograd.Function``'s results bit for bit, for every
    set of inputs that need a gradient, with or without bias; saved-tensor hooks see what it saves."""
    ok, why = backends.availability("cpp", "cpu")
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g).to(dtype)
    w = torch.randn(9, 5, generator=g).to(dtype)
    m = torch.randn((9,) if unit else (9, 5), generator=g)
    b = torch.randn(9, generator=g).to(dtype)
    gy = torch.randn(2, 3, 9, generator=g).to(dtype)

    def run(need: tuple[bool, ...], bias: bool):
        leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((x, w, m, b), need)]
        with backends.use("cpp"):
            y = apf.masked_linear(leaves[0], leaves[1], leaves[2], leaves[3] if bias else None)
            name = y.grad_fn.name() if y.grad_fn is not None else None
            if y.requires_grad:
                y.backward(gy)
        return y.detach(), [t.grad for t in leaves], name

    cpp = backends.get("cpp")
    for need in [(True, True, True, True), (False, True, True, True), (True, False, True, False),
                 (False, False, True, False), (True, True, False, True), (False, False, False, True)]:
        for bias in (True, False):
            native = run(need, bias)
            with monkeypatch.context() as mp:
                mp.setattr(cpp, "masked_linear_autograd", lambda *a, **k: None)  # the Python Function instead
                python = run(need, bias)
            if any(need[:3]) or (bias and need[3]):
                assert "MaskedLinearFunction" in native[2] and python[2] == "_MaskedLinearFnBackward"
            else:  # nothing to differentiate: no node on either path
                assert native[2] is None and python[2] is None
            assert torch.equal(native[0], python[0])
            for gn, gp in zip(native[1], python[1]):
                assert (gn is None) == (gp is None) and (gn is None or torch.equal(gn, gp)), (need, bias)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with backends.use("cpp"):
            apf.masked_linear(x, w.detach().requires_grad_(), m).sum().backward()
    assert len(packed) == 3  # input, weight, aux


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unit", [False, True])
def test_cpp_apply_mask_is_one_native_node(dtype, unit, monkeypatch):
    """apply_mask (what the masked convolutions and N:M masks use) likewise: one C++ node with the
    Python Function's results bit for bit, for a conv layer's weight and each needed gradient."""
    ok, why = backends.availability("cpp", "cpu")
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=g).to(dtype)
    w = torch.randn(4, 3, 3, 3, generator=g).to(dtype)
    m = torch.randn((4,) if unit else (4, 3, 3, 3), generator=g)
    gy = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
    cpp = backends.get("cpp")

    def run(need_w: bool, need_m: bool):
        wl, ml = w.clone().requires_grad_(need_w), m.clone().requires_grad_(need_m)
        with backends.use("cpp"):
            t = apf.apply_mask(wl, ml, surrogate="sigmoid", rule="chain")
            name = t.grad_fn.name() if t.grad_fn is not None else None
            y = torch.nn.functional.conv2d(x, t, padding=1)
            if y.requires_grad:
                y.backward(gy)
        return t.detach(), wl.grad, ml.grad, name

    for need_w, need_m in [(True, True), (True, False), (False, True), (False, False)]:
        native = run(need_w, need_m)
        with monkeypatch.context() as mp:
            mp.setattr(cpp, "apply_mask_autograd", lambda *a, **k: None)
            python = run(need_w, need_m)
        if need_w or need_m:
            assert "ApplyMaskFunction" in native[3] and python[3] == "_ApplyMaskFnBackward"
        else:
            assert native[3] is None and python[3] is None
        for a, b in zip(native[:3], python[:3]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (need_w, need_m)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_second_derivative_refused_through_every_input(backend, fast, monkeypatch):
    """A higher-order gradient towards the layer's input fails too (never None or partial), and with
    only the input requiring grad the first-order gradient still carries the refusing node."""
    monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 3, dtype=torch.float64)
    (gw,) = torch.autograd.grad(apf.masked_linear(x, w, m).pow(2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gw.pow(2).sum(), x, allow_unused=True)
    (gx,) = torch.autograd.grad(apf.masked_linear(x, w.detach(), m).pow(2).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_autocast_grad_out_dtype_is_refused_alike(backend, fast, monkeypatch):
    """Under CPU autocast a backend whose linear autocasts (reference, cpp) gives a bfloat16 output, so
    grad_out, while input is float32: every path refuses it in backward with the same TypeError (no
    silently mixed-precision gradient); a backend that keeps float32 steps normally."""
    monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
    x, w, m, b = (torch.randn(*s, requires_grad=True) for s in ((3, 5), (4, 5), (4, 5), (4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = apf.masked_linear(x, w, m, b)
    if y.dtype == torch.float32:
        y.sum().backward()
        assert w.grad is not None and m.grad is not None
        return
    assert y.dtype == torch.bfloat16 and backend in ("reference", "cpp")
    with pytest.raises(TypeError, match=r"^grad_out: expected dtype torch.float32 \(that of input\), got "
                                        r"torch.bfloat16"):
        y.float().sum().backward()


@pytest.mark.parametrize("fast", ["1", "0"])
def test_in_place_op_on_a_3d_output(backend, fast, monkeypatch):
    """nn.ReLU(inplace=True) after a masked linear on a sequence works on every path, as after
    nn.Linear, with the gradients of the out-of-place version."""
    monkeypatch.setenv("AUTOPRUNE_EAGER_FAST", fast)
    base = [torch.randn(*s, dtype=torch.float64) for s in ((2, 3, 5), (4, 5), (4, 5), (4,))]
    grads = []
    for inplace in (True, False):
        leaves = [t.clone().requires_grad_() for t in base]
        y = apf.masked_linear(*leaves)
        y = y.relu_() if inplace else y.relu()
        y.pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
