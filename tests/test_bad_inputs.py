"""Bad input, table-driven: every entry point, every backend, no silent wrong answers (issue #12).

Each case builds fresh arguments, snapshots every tensor and optimiser/model state it could write
(bit-exact clones), calls the entry point and asserts

* the exception type;
* that the message *starts* with the argument's name (regex ``match`` anchored at the start);
* that nothing was written: the snapshots compare bit-exactly after the error.

Cases marked ``per_backend`` run once per backend (``reference``, ``triton`` through its CPU
interpreter, ``cpp``) inside ``autoprune_ext.backends.use(name)``; a backend that
``backends.available()`` does not list is skipped. Validation lives in the op layer, so every backend
must raise the same error. The remaining tests cover what must keep working (all-meta calls,
``opcheck``) and the ``nonfinite`` modes of ``AuxAdam``.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import autoprune_ext as ap
from autoprune_ext import backends
from autoprune_ext import functional as APF
from autoprune_ext import reference as ref
from autoprune_ext.convert import tied_weights
from autoprune_ext.optim import AuxAdam

O = torch.ops.autoprune
AVAILABLE = backends.available()
HUGE = 1e300
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------------
# snapshots: bit-exact copies of everything a call could write
# --------------------------------------------------------------------------------------------------
def _bits(t: Tensor):
    t = t.detach()
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), t.dtype)
    return (tuple(t.shape), t.dtype, t.clone().contiguous().reshape(-1).view(torch.uint8))


def _opt_snapshot(opt: AuxAdam):
    groups = []
    for g in opt.param_groups:
        groups.append({k: copy.deepcopy(v) for k, v in g.items() if k != "params"} | {"n": len(g["params"])})
    params = []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p)
            params.append((_bits(p), None if st is None else {
                k: (_bits(v) if isinstance(v, Tensor) else v) for k, v in st.items()}))
    return ("opt", len(opt.param_groups), repr(groups), params, opt.skipped_steps, len(opt.state))


def _module_snapshot(m: nn.Module):
    return ("module", [(n, type(x).__name__) for n, x in m.named_modules()],
            [(n, _bits(p)) for n, p in m.named_parameters()])


def snapshot(objs):
    out = []
    for o in objs:
        if isinstance(o, Tensor):
            out.append(_bits(o))
        elif isinstance(o, AuxAdam):
            out.append(_opt_snapshot(o))
        elif isinstance(o, nn.Module):
            out.append(_module_snapshot(o))
        else:
            raise TypeError(type(o))
    return out


def assert_same(a, b, path="state"):
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} was written"
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path} changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path} changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert a == b, f"{path} changed: {a!r} -> {b!r}"


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[], tuple[Callable[[], object], list]]  # -> (call, objects to snapshot)
    exc: type[Exception]
    match: str  # regex matched at the start of the message
    per_backend: bool = True


CASES: list[Case] = []


def case(id: str, exc: type[Exception], match: str, make, *, per_backend: bool = True) -> None:
    assert all(c.id != id for c in CASES), id
    CASES.append(Case(id, make, exc, match, per_backend))


def rnd(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def meta(t: Tensor) -> Tensor:
    return t.to("meta")


# ---- functional.apply_mask ----------------------------------------------------------------------
def _apply(weight=None, aux=None, **kw):
    def make():
        w = rnd(4, 3) if weight is None else weight()
        m = rnd(4, 3) if aux is None else aux()
        watched = [t for t in (w, m) if isinstance(t, Tensor)]
        return (lambda: APF.apply_mask(w, m, **kw)), watched
    return make


def _nan_at(t: Tensor, value=NAN) -> Tensor:
    t.view(-1)[1] = value
    return t


case("apply_mask-weight-list", TypeError, r"weight: expected a torch\.Tensor", _apply(weight=lambda: [[1.0]]))
case("apply_mask-aux-none", TypeError, r"aux: expected a torch\.Tensor", _apply(aux=lambda: None))
case("apply_mask-aux-int", TypeError, r"aux: expected dtype in", _apply(aux=lambda: torch.ones(4, 3, dtype=torch.long)))
case("apply_mask-weight-int", TypeError, r"weight: expected dtype in",
     _apply(weight=lambda: torch.ones(4, 3, dtype=torch.int32)))
case("apply_mask-weight-bool", TypeError, r"weight: expected dtype in",
     _apply(weight=lambda: torch.ones(4, 3, dtype=torch.bool)))
case("apply_mask-scalar-weight", ValueError, r"weight: expected a tensor with at least one dimension",
     _apply(weight=lambda: torch.tensor(1.0), aux=lambda: torch.tensor(1.0)))
case("apply_mask-aux-shape", ValueError, r"aux: expected shape \(4, 3\)", _apply(aux=lambda: rnd(3, 4)))
case("apply_mask-unit-aux-size", ValueError, r"aux: expected shape", _apply(aux=lambda: rnd(3)))
case("apply_mask-aux-nan", ValueError, r"aux: expected finite values", _apply(aux=lambda: _nan_at(rnd(4, 3))))
case("apply_mask-aux-inf", ValueError, r"aux: expected finite values", _apply(aux=lambda: _nan_at(rnd(4, 3), INF)))
case("apply_mask-aux-meta", ValueError, r"aux: expected a tensor on cpu", _apply(aux=lambda: meta(rnd(4, 3))))
case("apply_mask-weight-meta", ValueError, r"aux: expected a tensor on meta", _apply(weight=lambda: meta(rnd(4, 3))))
case("apply_mask-surrogate", ValueError, r"surrogate: expected one of", _apply(surrogate="tanh"))
case("apply_mask-rule", ValueError, r"rule: expected one of", _apply(rule="straight"))
case("apply_mask-alpha-nan", ValueError, r"alpha: expected a finite float", _apply(alpha=NAN))
case("apply_mask-alpha-inf", ValueError, r"alpha: expected a finite float", _apply(alpha=-INF))
case("apply_mask-alpha-huge", ValueError, r"alpha: expected a finite float with \|alpha\| <= ", _apply(alpha=HUGE))
case("apply_mask-alpha-1e5", ValueError, r"alpha: expected a finite float with \|alpha\| <= ", _apply(alpha=1e5))
case("apply_mask-alpha-bool", ValueError, r"alpha: expected a finite float", _apply(alpha=True))
case("apply_mask-alpha-str", ValueError, r"alpha: expected a finite float", _apply(alpha="0.1"))


# ---- functional.masked_linear -------------------------------------------------------------------
def _linear(x=None, weight=None, aux=None, bias=None, **kw):
    def make():
        i = rnd(2, 3) if x is None else x()
        w = rnd(4, 3) if weight is None else weight()
        m = rnd(4, 3) if aux is None else aux()
        b = None if bias is None else bias()
        watched = [t for t in (i, w, m, b) if isinstance(t, Tensor)]
        return (lambda: APF.masked_linear(i, w, m, b, **kw)), watched
    return make


case("linear-input-features", ValueError, r"input: expected shape \[\.\.\., 3\]", _linear(x=lambda: rnd(2, 5)))
case("linear-input-scalar", ValueError, r"input: expected shape", _linear(x=lambda: torch.tensor(1.0)))
case("linear-input-list", TypeError, r"input: expected a torch\.Tensor", _linear(x=lambda: [[1.0, 2.0, 3.0]]))
case("linear-input-int", TypeError, r"input: expected dtype in", _linear(x=lambda: torch.ones(2, 3, dtype=torch.long)))
case("linear-input-fp64", TypeError, r"input: expected dtype torch\.float32", _linear(x=lambda: rnd(2, 3, dtype=torch.float64)))
case("linear-input-meta", ValueError, r"input: expected a tensor on cpu", _linear(x=lambda: meta(rnd(2, 3))))
case("linear-weight-3d", ValueError, r"weight: expected a 2-D tensor",
     _linear(weight=lambda: rnd(4, 3, 1), aux=lambda: rnd(4, 3, 1)))
case("linear-bias-shape", ValueError, r"bias: expected shape \(4,\)", _linear(bias=lambda: rnd(3)))
case("linear-bias-dtype", TypeError, r"bias: expected dtype torch\.float32", _linear(bias=lambda: rnd(4, dtype=torch.float64)))
case("linear-bias-int", TypeError, r"bias: expected dtype in", _linear(bias=lambda: torch.ones(4, dtype=torch.long)))
case("linear-bias-meta", ValueError, r"bias: expected a tensor on cpu", _linear(bias=lambda: meta(rnd(4))))
case("linear-aux-meta", ValueError, r"aux: expected a tensor on cpu", _linear(aux=lambda: meta(rnd(4, 3))))
case("linear-aux-nan", ValueError, r"aux: expected finite values", _linear(aux=lambda: _nan_at(rnd(4, 3))))
case("linear-alpha-huge", ValueError, r"alpha: expected a finite float", _linear(alpha=HUGE))


# ---- functional.masked_conv1d/2d ----------------------------------------------------------------
def _conv(dims, x=None, weight=None, aux=None, bias=None):
    def make():
        i = (rnd(1, 2, 5, 5) if dims == 2 else rnd(1, 2, 7)) if x is None else x()
        w = (rnd(3, 2, 3, 3) if dims == 2 else rnd(3, 2, 3)) if weight is None else weight()
        m = torch.randn_like(w) if aux is None else aux()
        b = None if bias is None else bias()
        fn = APF.masked_conv2d if dims == 2 else APF.masked_conv1d
        watched = [t for t in (i, w, m, b) if isinstance(t, Tensor)]
        return (lambda: fn(i, w, m, b)), watched
    return make


case("conv2d-aux-shape", ValueError, r"aux: expected shape", _conv(2, aux=lambda: rnd(1, 2, 3, 3)))
case("conv2d-aux-nan", ValueError, r"aux: expected finite values", _conv(2, aux=lambda: _nan_at(rnd(3, 2, 3, 3))))
case("conv2d-input-int", TypeError, r"input: expected dtype in", _conv(2, x=lambda: torch.ones(1, 2, 5, 5, dtype=torch.long)))
case("conv2d-input-fp64", TypeError, r"input: expected dtype torch\.float32",
     _conv(2, x=lambda: rnd(1, 2, 5, 5, dtype=torch.float64)))
case("conv2d-input-2d", ValueError, r"input: expected a 3-D or 4-D tensor", _conv(2, x=lambda: rnd(5, 5)))
case("conv2d-input-meta", ValueError, r"input: expected a tensor on cpu", _conv(2, x=lambda: meta(rnd(1, 2, 5, 5))))
case("conv2d-weight-3d", ValueError, r"weight: expected a 4-D tensor",
     _conv(2, weight=lambda: rnd(3, 2, 3), aux=lambda: rnd(3, 2, 3)))
case("conv2d-bias-dtype", TypeError, r"bias: expected dtype torch\.float32", _conv(2, bias=lambda: rnd(3, dtype=torch.float16)))
case("conv1d-bias-shape", ValueError, r"bias: expected shape \(3,\)", _conv(1, bias=lambda: rnd(2)))
case("conv1d-weight-list", TypeError, r"weight: expected a torch\.Tensor", _conv(1, weight=lambda: [1.0], aux=lambda: rnd(3)))
case("conv1d-aux-meta", ValueError, r"aux: expected a tensor on cpu", _conv(1, aux=lambda: meta(rnd(3, 2, 3))))


# ---- masked layers ------------------------------------------------------------------------------
def _layer(build, x, prep=None):
    def make():
        layer = build()
        if prep is not None:
            with torch.no_grad():
                prep(layer)
        i = x()
        return (lambda: layer(i)), [layer]
    return make


case("MaskedLinear-nan-aux", ValueError, r"aux: expected finite values",
     _layer(lambda: ap.nn.MaskedLinear(3, 2), lambda: rnd(1, 3), lambda l: l.weight_aux.fill_(NAN)))
case("MaskedLinear-input-int", TypeError, r"input: expected dtype in",
     _layer(lambda: ap.nn.MaskedLinear(3, 2), lambda: torch.ones(1, 3, dtype=torch.long)))
case("MaskedLinear-input-meta", ValueError, r"input: expected a tensor on cpu",
     _layer(lambda: ap.nn.MaskedLinear(3, 2), lambda: meta(rnd(1, 3))))
case("MaskedLinear-unit-nan-aux", ValueError, r"aux: expected finite values",
     _layer(lambda: ap.nn.MaskedLinear(3, 2, granularity="unit"), lambda: rnd(1, 3), lambda l: l.weight_aux.fill_(INF)))
case("MaskedConv2d-input-int", TypeError, r"input: expected dtype in",
     _layer(lambda: ap.nn.MaskedConv2d(2, 3, 3), lambda: torch.ones(1, 2, 5, 5, dtype=torch.long)))
case("MaskedConv2d-nan-aux", ValueError, r"aux: expected finite values",
     _layer(lambda: ap.nn.MaskedConv2d(2, 3, 3), lambda: rnd(1, 2, 5, 5), lambda l: l.weight_aux.fill_(NAN)))
case("MaskedConv1d-input-meta", ValueError, r"input: expected a tensor on cpu",
     _layer(lambda: ap.nn.MaskedConv1d(2, 3, 3), lambda: meta(rnd(1, 2, 7))))
case("MaskedConv1d-2:4-nan-aux", ValueError, r"aux: expected finite values",
     _layer(lambda: ap.nn.MaskedConv1d(4, 3, 2, granularity="2:4"), lambda: rnd(1, 4, 7),
            lambda l: l.weight_aux.view(-1)[0].fill_(NAN)))


def _construct(fn):
    return lambda: (fn, [])


case("MaskedLinear-alpha-huge", ValueError, r"alpha: expected a finite float",
     _construct(lambda: ap.nn.MaskedLinear(3, 2, surrogate="leaky_relu", alpha=HUGE)), per_backend=False)
case("MaskedLinear-granularity", ValueError, r"granularity: expected 'N:M' with 1 <= N <= M",
     _construct(lambda: ap.nn.MaskedLinear(4, 2, granularity="3:2")), per_backend=False)
case("MaskedConv2d-surrogate", ValueError, r"surrogate: expected one of",
     _construct(lambda: ap.nn.MaskedConv2d(2, 3, 3, surrogate="tanh")), per_backend=False)


# ---- torch.ops.autoprune.apply_mask / mask_backward ---------------------------------------------
def _op_apply(weight=None, aux=None, alpha=0.1, surrogate="softplus", rule="sign"):
    def make():
        w = rnd(4, 3) if weight is None else weight()
        m = rnd(4, 3) if aux is None else aux()
        return (lambda: O.apply_mask(w, m, surrogate, rule, alpha)), [w, m]
    return make


case("op-apply_mask-aux-meta", ValueError, r"aux: expected a tensor on cpu", _op_apply(aux=lambda: meta(rnd(4, 3))))
case("op-apply_mask-unit-aux-meta", ValueError, r"aux: expected a tensor on cpu", _op_apply(aux=lambda: meta(rnd(4))))
case("op-apply_mask-alpha-nan", ValueError, r"alpha: expected a finite float", _op_apply(alpha=NAN))
case("op-apply_mask-alpha-huge", ValueError, r"alpha: expected a finite float", _op_apply(alpha=HUGE))
case("op-apply_mask-aux-shape", ValueError, r"aux: expected shape", _op_apply(aux=lambda: rnd(2, 6)))
case("op-apply_mask-aux-int", TypeError, r"aux: expected dtype in", _op_apply(aux=lambda: torch.ones(4, 3, dtype=torch.int8)))
case("op-apply_mask-rule", ValueError, r"rule: expected one of", _op_apply(rule="chian"))


def _op_mask_backward(grad=None, weight=None, aux=None, alpha=0.1, surrogate="softplus", rule="sign"):
    def make():
        w = rnd(4, 3) if weight is None else weight()
        m = rnd(4, 3) if aux is None else aux()
        g = rnd(4, 3) if grad is None else grad()
        return (lambda: O.mask_backward(g, w, m, surrogate, rule, alpha, True, True)), [g, w, m]
    return make


case("op-mask_backward-grad-int", TypeError, r"grad: expected dtype in",
     _op_mask_backward(grad=lambda: torch.ones(4, 3, dtype=torch.long)))
case("op-mask_backward-grad-fp64", TypeError, r"grad: expected dtype torch\.float32 \(that of weight\)",
     _op_mask_backward(grad=lambda: rnd(4, 3, dtype=torch.float64)))
case("op-mask_backward-grad-bf16", TypeError, r"grad: expected dtype torch\.float32",
     _op_mask_backward(grad=lambda: rnd(4, 3, dtype=torch.bfloat16)))
case("op-mask_backward-grad-shape", ValueError, r"grad: expected shape \(4, 3\)", _op_mask_backward(grad=lambda: rnd(3, 4)))
case("op-mask_backward-grad-meta", ValueError, r"grad: expected a tensor on cpu",
     _op_mask_backward(grad=lambda: meta(rnd(4, 3))))
case("op-mask_backward-aux-meta", ValueError, r"aux: expected a tensor on cpu",
     _op_mask_backward(aux=lambda: meta(rnd(4, 3))))
case("op-mask_backward-weight-meta", ValueError, r"aux: expected a tensor on meta",
     _op_mask_backward(weight=lambda: meta(rnd(4, 3))))
case("op-mask_backward-rule", ValueError, r"rule: expected one of", _op_mask_backward(rule="x"))
case("op-mask_backward-alpha-inf", ValueError, r"alpha: expected a finite float", _op_mask_backward(alpha=INF))
case("op-mask_backward-surrogate", ValueError, r"surrogate: expected one of", _op_mask_backward(surrogate="elu"))


# ---- masked_linear / masked_linear_backward ops -------------------------------------------------
def _op_linear(x=None, bias=None):
    def make():
        i = rnd(2, 3) if x is None else x()
        w, m = rnd(4, 3), rnd(4, 3)
        b = None if bias is None else bias()
        watched = [t for t in (i, w, m, b) if t is not None]
        return (lambda: O.masked_linear(i, w, m, b, "softplus", "sign", 0.1)), watched
    return make


case("op-masked_linear-input-meta", ValueError, r"input: expected a tensor on cpu", _op_linear(x=lambda: meta(rnd(2, 3))))
case("op-masked_linear-bias-meta", ValueError, r"bias: expected a tensor on cpu", _op_linear(bias=lambda: meta(rnd(4))))
case("op-masked_linear-bias-dtype", TypeError, r"bias: expected dtype torch\.float32",
     _op_linear(bias=lambda: rnd(4, dtype=torch.bfloat16)))


def _op_linear_backward(grad_out=None, x=None, aux=None):
    def make():
        i = rnd(2, 3) if x is None else x()
        w = rnd(4, 3)
        m = rnd(4, 3) if aux is None else aux()
        g = rnd(2, 4) if grad_out is None else grad_out()
        return (lambda: O.masked_linear_backward(g, i, w, m, "softplus", "sign", 0.1, True, True, True, True)), \
            [g, i, w, m]
    return make


case("op-linear_backward-grad_out-int", TypeError, r"grad_out: expected dtype in",
     _op_linear_backward(grad_out=lambda: torch.ones(2, 4, dtype=torch.long)))
case("op-linear_backward-grad_out-fp64", TypeError, r"grad_out: expected dtype torch\.float32 \(that of input\)",
     _op_linear_backward(grad_out=lambda: rnd(2, 4, dtype=torch.float64)))
case("op-linear_backward-grad_out-fp16", TypeError, r"grad_out: expected dtype torch\.float32",
     _op_linear_backward(grad_out=lambda: rnd(2, 4, dtype=torch.float16)))
case("op-linear_backward-grad_out-shape", ValueError, r"grad_out: expected shape \(2, 4\)",
     _op_linear_backward(grad_out=lambda: rnd(4, 2)))
case("op-linear_backward-grad_out-meta", ValueError, r"grad_out: expected a tensor on cpu",
     _op_linear_backward(grad_out=lambda: meta(rnd(2, 4))))
case("op-linear_backward-input-meta", ValueError, r"input: expected a tensor on cpu",
     _op_linear_backward(x=lambda: meta(rnd(2, 3))))
case("op-linear_backward-aux-meta", ValueError, r"aux: expected a tensor on cpu",
     _op_linear_backward(aux=lambda: meta(rnd(4, 3))))


# ---- aux_adam_step_ ------------------------------------------------------------------------------
ADAM_ORDER = ("aux", "exp_avg", "exp_avg_sq", "grad", "weight", "step", "lr", "beta1", "beta2", "eps",
              "penalty_scale", "rho", "surrogate", "alpha")


def _adam_base():
    return dict(aux=rnd(4, 3), exp_avg=rnd(4, 3) * 0.1, exp_avg_sq=rnd(4, 3).abs() * 0.1, grad=rnd(4, 3),
                weight=rnd(4, 3), step=2, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=0.1,
                rho=1e-3, surrogate="softplus", alpha=0.1)


def _adam(**over):
    """``over``: values, or callables of the base arguments (to build aliases)."""
    def make():
        a = _adam_base()
        for k, v in over.items():
            a[k] = v(a) if callable(v) else v
        watched = [a[k] for k in ("aux", "exp_avg", "exp_avg_sq", "grad", "weight") if isinstance(a[k], Tensor)]
        return (lambda: O.aux_adam_step_(*(a[k] for k in ADAM_ORDER))), watched
    return make


def _expand(a):
    return rnd(3).expand(4, 3)


def _overlapping_view(a):
    return torch.zeros(20).as_strided((4, 3), (2, 1))


def _shared_buffer(a):
    buf = torch.zeros(24)
    a["aux"] = buf[:12].view(4, 3)
    return buf[6:18].view(4, 3)


case("adam-exp_avg-shape", ValueError, r"exp_avg: expected shape \(4, 3\)", _adam(exp_avg=torch.zeros(3)))
case("adam-exp_avg_sq-shape", ValueError, r"exp_avg_sq: expected shape \(4, 3\)", _adam(exp_avg_sq=torch.zeros(4, 4)))
case("adam-grad-shape", ValueError, r"grad: expected shape \(4, 3\)", _adam(grad=torch.zeros(12)))
case("adam-weight-shape", ValueError, r"weight: expected shape \(4, 3\)", _adam(weight=torch.zeros(4, 1)))
case("adam-exp_avg-int", TypeError, r"exp_avg: expected dtype in", _adam(exp_avg=torch.zeros(4, 3, dtype=torch.long)))
case("adam-grad-int", TypeError, r"grad: expected dtype in", _adam(grad=torch.zeros(4, 3, dtype=torch.int32)))
case("adam-aux-meta", ValueError, r"exp_avg: expected a tensor on meta", _adam(aux=lambda a: meta(a["aux"])))
case("adam-exp_avg-meta", ValueError, r"exp_avg: expected a tensor on cpu", _adam(exp_avg=lambda a: meta(a["exp_avg"])))
case("adam-exp_avg_sq-meta", ValueError, r"exp_avg_sq: expected a tensor on cpu",
     _adam(exp_avg_sq=lambda a: meta(a["exp_avg_sq"])))
case("adam-grad-meta", ValueError, r"grad: expected a tensor on cpu", _adam(grad=lambda a: meta(a["grad"])))
case("adam-weight-meta", ValueError, r"weight: expected a tensor on cpu", _adam(weight=lambda a: meta(a["weight"])))
case("adam-step-0", ValueError, r"step: expected an integer >= 1", _adam(step=0))
case("adam-step-negative", ValueError, r"step: expected an integer >= 1", _adam(step=-3))
case("adam-lr-inf", ValueError, r"lr: expected a finite float >= 0", _adam(lr=INF))
case("adam-lr-nan", ValueError, r"lr: expected a finite float >= 0", _adam(lr=NAN))
case("adam-lr-negative", ValueError, r"lr: expected a finite float >= 0", _adam(lr=-1e-3))
case("adam-eps-inf", ValueError, r"eps: expected a finite float >= 0", _adam(eps=INF))
case("adam-eps-nan", ValueError, r"eps: expected a finite float >= 0", _adam(eps=NAN))
case("adam-eps-negative", ValueError, r"eps: expected a finite float >= 0", _adam(eps=-1e-8))
case("adam-beta1-one", ValueError, r"beta1: expected a finite float in \[0, 1\)", _adam(beta1=1.0))
case("adam-beta1-nan", ValueError, r"beta1: expected a finite float in \[0, 1\)", _adam(beta1=NAN))
case("adam-beta2-negative", ValueError, r"beta2: expected a finite float in \[0, 1\)", _adam(beta2=-0.1))
case("adam-beta2-inf", ValueError, r"beta2: expected a finite float in \[0, 1\)", _adam(beta2=INF))
case("adam-penalty_scale-inf", ValueError, r"penalty_scale: expected a finite float", _adam(penalty_scale=INF))
case("adam-penalty_scale-nan", ValueError, r"penalty_scale: expected a finite float", _adam(penalty_scale=NAN))
case("adam-rho-nan", ValueError, r"rho: expected a finite float", _adam(rho=NAN))
case("adam-rho-inf", ValueError, r"rho: expected a finite float", _adam(rho=-INF))
case("adam-alpha-huge", ValueError, r"alpha: expected a finite float with \|alpha\| <= ",
     _adam(alpha=HUGE, surrogate="leaky_relu"))
case("adam-alpha-nan", ValueError, r"alpha: expected a finite float", _adam(alpha=NAN))
case("adam-surrogate", ValueError, r"surrogate: expected one of", _adam(surrogate="tanh"))
case("adam-aux-expand", ValueError, r"aux: expected a tensor whose elements do not overlap", _adam(aux=_expand))
case("adam-exp_avg-expand", ValueError, r"exp_avg: expected a tensor whose elements do not overlap", _adam(exp_avg=_expand))
case("adam-exp_avg_sq-as_strided", ValueError, r"exp_avg_sq: expected a tensor whose elements do not overlap",
     _adam(exp_avg_sq=_overlapping_view))
case("adam-exp_avg-is-aux", ValueError, r"exp_avg: expected memory that overlaps no other .* overlaps aux",
     _adam(exp_avg=lambda a: a["aux"]))
case("adam-exp_avg_sq-is-exp_avg", ValueError, r"exp_avg_sq: expected memory that overlaps no other .* overlaps exp_avg",
     _adam(exp_avg_sq=lambda a: a["exp_avg"]))
case("adam-grad-is-aux", ValueError, r"aux: expected memory that overlaps no other .* overlaps grad",
     _adam(grad=lambda a: a["aux"]))
case("adam-weight-is-exp_avg", ValueError, r"exp_avg: expected memory .* overlaps weight",
     _adam(weight=lambda a: a["exp_avg"]))
case("adam-grad-view-of-exp_avg_sq", ValueError, r"exp_avg_sq: expected memory .* overlaps grad",
     _adam(grad=lambda a: a["exp_avg_sq"][:]))
case("adam-exp_avg-partial-overlap", ValueError, r"exp_avg: expected memory .* overlaps aux", _adam(exp_avg=_shared_buffer))


# ---- aux_adam_step_multi_ -----------------------------------------------------------------------
def _multi(mutate=None, **scalars):
    def make():
        n = 3
        lists = dict(aux=[rnd(4, 3) for _ in range(n)], exp_avg=[rnd(4, 3) * 0.1 for _ in range(n)],
                     exp_avg_sq=[rnd(4, 3).abs() * 0.1 for _ in range(n)], grads=[rnd(4, 3) for _ in range(n)],
                     weights=[rnd(4, 3), None, rnd(4, 3)], steps=[1, 2, 3], penalty_scales=[0.1, 0.0, 0.2])
        hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, rho=1e-3, surrogate="softplus", alpha=0.1) | scalars
        if mutate is not None:
            mutate(lists)
        watched = [t for k in ("aux", "exp_avg", "exp_avg_sq", "grads", "weights") for t in lists[k]
                   if isinstance(t, Tensor)]
        return (lambda: O.aux_adam_step_multi_(
            lists["aux"], lists["exp_avg"], lists["exp_avg_sq"], lists["grads"], lists["weights"], lists["steps"],
            lists["penalty_scales"], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["rho"], hp["surrogate"],
            hp["alpha"])), watched
    return make


def _set(key, i, fn):
    def mutate(lists):
        lists[key][i] = fn(lists)
    return mutate


case("multi-steps-length", ValueError, r"steps: expected a list of 3 entries", _multi(lambda l: l["steps"].pop()))
case("multi-exp_avg-length", ValueError, r"exp_avg: expected a list of 3 entries", _multi(lambda l: l["exp_avg"].pop()))
case("multi-penalty_scales-length", ValueError, r"penalty_scales: expected a list of 3 entries",
     _multi(lambda l: l["penalty_scales"].append(0.0)))
case("multi-aux-duplicate", ValueError, r"aux\[1\]: expected memory that overlaps no other .* overlaps aux\[0\]",
     _multi(_set("aux", 1, lambda l: l["aux"][0])))
case("multi-aux-duplicate-far", ValueError, r"aux\[2\]: expected memory .* overlaps aux\[0\]",
     _multi(_set("aux", 2, lambda l: l["aux"][0])))
case("multi-exp_avg-duplicate", ValueError, r"exp_avg\[1\]: expected memory .* overlaps exp_avg\[0\]",
     _multi(_set("exp_avg", 1, lambda l: l["exp_avg"][0])))
case("multi-exp_avg_sq-is-aux-of-other", ValueError, r"exp_avg_sq\[2\]: expected memory .* overlaps aux\[0\]",
     _multi(_set("exp_avg_sq", 2, lambda l: l["aux"][0])))
case("multi-grad-aliases-other-aux", ValueError, r"aux\[0\]: expected memory .* overlaps grad\[1\]",
     _multi(_set("grads", 1, lambda l: l["aux"][0])))
case("multi-weight-aliases-other-exp_avg_sq", ValueError, r"exp_avg_sq\[0\]: expected memory .* overlaps weight\[2\]",
     _multi(_set("weights", 2, lambda l: l["exp_avg_sq"][0])))
case("multi-aux-expand", ValueError, r"aux\[0\]: expected a tensor whose elements do not overlap",
     _multi(_set("aux", 0, lambda l: rnd(3).expand(4, 3))))
case("multi-aux-meta", ValueError, r"aux\[1\]: expected a tensor on cpu \(the device of aux\[0\]\)",
     _multi(_set("aux", 1, lambda l: meta(l["aux"][1]))))
case("multi-exp_avg-meta", ValueError, r"exp_avg\[2\]: expected a tensor on cpu",
     _multi(_set("exp_avg", 2, lambda l: meta(l["exp_avg"][2]))))
case("multi-exp_avg_sq-shape", ValueError, r"exp_avg_sq\[1\]: expected shape \(4, 3\)",
     _multi(_set("exp_avg_sq", 1, lambda l: torch.zeros(4))))
case("multi-grad-int", TypeError, r"grad\[0\]: expected dtype in",
     _multi(_set("grads", 0, lambda l: torch.zeros(4, 3, dtype=torch.long))))
case("multi-step-zero", ValueError, r"step\[1\]: expected an integer >= 1", _multi(_set("steps", 1, lambda l: 0)))
case("multi-penalty_scale-nan", ValueError, r"penalty_scale\[2\]: expected a finite float",
     _multi(_set("penalty_scales", 2, lambda l: NAN)))
case("multi-penalty_scale-inf", ValueError, r"penalty_scale\[0\]: expected a finite float",
     _multi(_set("penalty_scales", 0, lambda l: INF)))
case("multi-lr-inf", ValueError, r"lr: expected a finite float >= 0", _multi(lr=INF))
case("multi-eps-nan", ValueError, r"eps: expected a finite float >= 0", _multi(eps=NAN))
case("multi-beta1-inf", ValueError, r"beta1: expected a finite float in \[0, 1\)", _multi(beta1=INF))
case("multi-rho-nan", ValueError, r"rho: expected a finite float", _multi(rho=NAN))
case("multi-alpha-huge", ValueError, r"alpha: expected a finite float", _multi(alpha=HUGE))


# ---- nm_scores -----------------------------------------------------------------------------------
def _nm(fn, aux, n=2, m=4):
    def make():
        a = aux()
        return (lambda: fn(a, n, m)), [a]
    return make


case("op-nm_scores-n-gt-m", ValueError, r"n, m: expected 1 <= n <= m", _nm(O.nm_scores, lambda: rnd(4, 8), 5, 4))
case("op-nm_scores-m-too-big", ValueError, r"n, m: expected 1 <= n <= m <= 32", _nm(O.nm_scores, lambda: rnd(4, 64), 2, 64))
case("op-nm_scores-rows", ValueError, r"aux: expected rows .* groups of m=4", _nm(O.nm_scores, lambda: rnd(4, 6)))
case("op-nm_scores-scalar", ValueError, r"aux: expected a tensor with at least one dimension",
     _nm(O.nm_scores, lambda: torch.tensor(1.0)))
case("op-nm_scores-int", TypeError, r"aux: expected dtype in", _nm(O.nm_scores, lambda: torch.ones(4, 8, dtype=torch.long)))
case("nm_scores-n-float", TypeError, r"n: expected an int", _nm(APF.nm_scores, lambda: rnd(4, 8), 2.0, 4))
case("nm_scores-nan", ValueError, r"aux: expected finite values", _nm(APF.nm_scores, lambda: _nan_at(rnd(4, 8))))
case("apply_nm_mask-aux-none", TypeError, r"aux: expected a torch\.Tensor",
     _nm(lambda a, n, m: APF.apply_nm_mask(rnd(4, 8), None, n, m), lambda: rnd(4, 8)))
case("apply_nm_mask-aux-unit-shape", ValueError, r"aux: expected weight's shape \(4, 8\) for N:M granularity",
     _nm(lambda a, n, m: APF.apply_nm_mask(rnd(4, 8), a, n, m), lambda: rnd(4)))
case("apply_nm_mask-aux-meta", ValueError, r"aux: expected a tensor on cpu",
     _nm(lambda a, n, m: APF.apply_nm_mask(rnd(4, 8), a, n, m), lambda: meta(rnd(4, 8))))
case("nm_scores-zero-n", ValueError, r"n, m: expected 1 <= n <= m", _nm(APF.nm_scores, lambda: rnd(4, 8), 0, 4))


# ---- AuxAdam construction ------------------------------------------------------------------------
def _aux_param():
    return nn.Parameter(rnd(4, 3))


def _ctor(**kw):
    def make():
        p = _aux_param()
        return (lambda: AuxAdam([p], **kw)), [p]
    return make


for key, value, pattern in [
    ("lr", INF, r"lr: expected a finite float >= 0"), ("lr", NAN, r"lr: expected a finite float >= 0"),
    ("lr", -1.0, r"lr: expected a finite float >= 0"), ("eps", NAN, r"eps: expected a finite float >= 0"),
    ("eps", INF, r"eps: expected a finite float >= 0"), ("betas", (0.9, NAN), r"betas: expected two floats in \[0, 1\)"),
    ("betas", (1.0, 0.9), r"betas: expected two floats in \[0, 1\)"), ("betas", (0.9,), r"betas: expected two floats"),
    ("penalty", INF, r"penalty: expected a finite float >= 0"), ("penalty", -0.1, r"penalty: expected a finite float >= 0"),
    ("penalty", NAN, r"penalty: expected a finite float >= 0"), ("rho", NAN, r"rho: expected a finite float >= 0"),
    ("rho", INF, r"rho: expected a finite float >= 0"), ("alpha", HUGE, r"alpha: expected a finite float"),
    ("alpha", NAN, r"alpha: expected a finite float"), ("surrogate", "tanh", r"surrogate: expected one of"),
    ("nonfinite", "ignore", r"nonfinite: expected one of \('raise', 'skip'\)"),
    ("memory", "fp8", r"memory: expected one of"), ("penalty_mode", "sum", r"penalty_mode: expected one of"),
]:
    case(f"AuxAdam-{key}-{value!r}", ValueError, pattern, _ctor(**{key: value}), per_backend=False)


def _ctor_params(build):
    def make():
        params = build()
        flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        return (lambda: AuxAdam(params)), flat
    return make


def _shared_storage():
    base = rnd(4, 3)
    return [nn.Parameter(base), nn.Parameter(base)]


case("AuxAdam-duplicate-param", ValueError, r"params: expected distinct parameters.*\['params'\]\[1\] is .*\['params'\]\[0\]",
     _ctor_params(lambda: (lambda p: [p, p])(_aux_param())), per_backend=False)
case("AuxAdam-duplicate-across-groups", ValueError, r"params: expected distinct parameters.*param_groups\[1\]",
     _ctor_params(lambda: (lambda p: [{"params": [p]}, {"params": [_aux_param(), p]}])(_aux_param())), per_backend=False)
case("AuxAdam-shared-storage", ValueError, r"params: expected parameters that share no memory",
     _ctor_params(_shared_storage), per_backend=False)
case("AuxAdam-layer_scale-negative", ValueError, r"layer_scale: expected 1 finite non-negative floats",
     _ctor_params(lambda: [{"params": [_aux_param()], "layer_scale": [-1.0]}]), per_backend=False)
case("AuxAdam-layer_scale-nan", ValueError, r"layer_scale: expected 1 finite non-negative floats",
     _ctor_params(lambda: [{"params": [_aux_param()], "layer_scale": [NAN]}]), per_backend=False)
case("AuxAdam-group-lr-inf", ValueError, r"lr: expected a finite float >= 0, got inf \(param_groups\[1\]\)",
     _ctor_params(lambda: [{"params": [_aux_param()]}, {"params": [_aux_param()], "lr": INF}]), per_backend=False)


def _add_group(build_group):
    def make():
        p = _aux_param()
        opt = AuxAdam([p])
        g = build_group(p)
        return (lambda: opt.add_param_group(g)), [opt, p]
    return make


case("AuxAdam.add_param_group-duplicate", ValueError, r"params: expected distinct parameters",
     _add_group(lambda p: {"params": [p]}), per_backend=False)
case("AuxAdam.add_param_group-penalty-nan", ValueError, r"penalty: expected a finite float >= 0",
     _add_group(lambda p: {"params": [_aux_param()], "penalty": NAN}), per_backend=False)
case("AuxAdam.add_param_group-shared-storage", ValueError, r"params: expected parameters that share no memory",
     _add_group(lambda p: {"params": [nn.Parameter(p.data)]}), per_backend=False)


# ---- AuxAdam.step: values changed after construction, gradients, corrupted state --------------------
def _net():
    return ap.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


def _backward(m):
    m.zero_grad(set_to_none=True)
    m(torch.randn(5, 3)).square().mean().backward()


def _step_case(spoil, *, foreach=True, warm=True, **kw):
    """An optimiser over a two-group model, stepped once (state exists, unless ``warm=False``), then
    ``spoil(opt, model)`` breaks something; the next ``step()`` must raise and write nothing."""
    def make():
        m = _net()
        opt = AuxAdam.from_model(m, penalty={"0": 0.1, "2": 0.2}, foreach=foreach, **kw)
        if warm:
            _backward(m)
            opt.step()
        _backward(m)
        spoil(opt, m)
        return opt.step, [opt, m]
    return make


def _group_value(key, value, gi=1):
    def spoil(opt, m):
        opt.param_groups[gi][key] = value
    return spoil


for key, value, pattern in [
    ("penalty", -0.5, r"penalty: expected a finite float >= 0, got -0\.5 \(param_groups\[1\]\)"),
    ("penalty", INF, r"penalty: expected a finite float >= 0, got inf"),
    ("lr", INF, r"lr: expected a finite float >= 0"), ("lr", NAN, r"lr: expected a finite float >= 0"),
    ("rho", NAN, r"rho: expected a finite float >= 0"), ("eps", NAN, r"eps: expected a finite float >= 0"),
    ("betas", (0.9, 1.5), r"betas: expected two floats in \[0, 1\)"), ("alpha", HUGE, r"alpha: expected a finite float"),
    ("layer_scale", [NAN], r"layer_scale: expected 1 finite non-negative floats"),
]:
    case(f"AuxAdam.step-{key}-{value!r}", ValueError, pattern, _step_case(_group_value(key, value)))

case("AuxAdam.step-penalty-negative-cold", ValueError, r"penalty: expected a finite float >= 0",
     _step_case(_group_value("penalty", -1.0, 0), warm=False))
case("AuxAdam.step-penalty-inf-relative", ValueError, r"penalty: expected a finite float >= 0",
     _step_case(_group_value("penalty", INF, 0), penalty_mode="relative"))


def _grad_value(layer, value, index=0):
    def spoil(opt, m):
        m[layer].weight_aux.grad.view(-1)[index] = value
    return spoil


case("AuxAdam.step-grad-nan", ValueError,
     r"grad: expected finite gradients, found NaN or inf in the gradient of param_groups\[1\]\['params'\]\[0\] "
     r"\('2\.weight_aux'\)", _step_case(_grad_value(2, NAN)))
case("AuxAdam.step-grad-inf", ValueError,
     r"grad: expected finite gradients, .* param_groups\[0\]\['params'\]\[0\] \('0\.weight_aux'\)",
     _step_case(_grad_value(0, INF, 5)))
case("AuxAdam.step-grad-neg-inf-cold", ValueError, r"grad: expected finite gradients, .*'0\.weight_aux'",
     _step_case(_grad_value(0, -INF), warm=False))
case("AuxAdam.step-grad-nan-no-foreach", ValueError, r"grad: expected finite gradients, .*'2\.weight_aux'",
     _step_case(_grad_value(2, NAN), foreach=False))


def _grad_nan_plain():
    p, q = _aux_param(), _aux_param()
    opt = AuxAdam([p, q])
    p.grad, q.grad = rnd(4, 3), _nan_at(rnd(4, 3))
    return opt.step, [opt, p, q]


case("AuxAdam.step-grad-nan-unnamed", ValueError,
     r"grad: expected finite gradients, found NaN or inf in the gradient of param_groups\[0\]\['params'\]\[1\];",
     _grad_nan_plain)


def _state_value(layer, key, value):
    def spoil(opt, m):
        opt.state[m[layer].weight_aux][key] = value
    return spoil


# groups with equal hyper-parameters are stepped by one fused call, whose op-layer errors name list
# entries ([i]) and the parameters behind them
case("AuxAdam.step-state-exp_avg-shape", ValueError,
     r"exp_avg\[1\]: expected shape \(2, 4\).*\[1\] = param_groups\[1\]\['params'\]\[0\] \('2\.weight_aux'\)",
     _step_case(_state_value(2, "exp_avg", torch.zeros(3))))
case("AuxAdam.step-state-exp_avg_sq-int", TypeError, r"exp_avg_sq\[1\]: expected dtype in.*'2\.weight_aux'",
     _step_case(_state_value(2, "exp_avg_sq", torch.zeros(2, 4, dtype=torch.long))))
case("AuxAdam.step-state-exp_avg-expanded", ValueError, r"exp_avg\[1\]: expected a tensor whose elements.*'2\.weight_aux'",
     _step_case(_state_value(2, "exp_avg", torch.zeros(4).expand(2, 4))))
case("AuxAdam.step-state-step-negative", ValueError, r"step: expected a non-negative int in the state of .*'0\.weight_aux'",
     _step_case(_state_value(0, "step", -2)))
case("AuxAdam.step-state-exp_avg-missing", TypeError, r"exp_avg, exp_avg_sq: expected tensors in the state of .*'2\.weight_aux'",
     _step_case(_state_value(2, "exp_avg", None)))


def _shared_moments(opt, m):
    b = m[2].weight_aux
    opt.state[b]["exp_avg_sq"] = opt.state[b]["exp_avg"]


case("AuxAdam.step-state-moments-aliased", ValueError,
     r"exp_avg_sq\[1\]: expected memory .* overlaps exp_avg\[1\].*'2\.weight_aux'", _step_case(_shared_moments))


def _param_added_twice(opt, m):
    opt.param_groups[1]["params"].append(m[0].weight_aux)
    opt.param_groups[1]["layer_scale"].append(1.0)


case("AuxAdam.step-param-in-two-groups", ValueError,
     r"aux\[2\]: expected memory .* overlaps aux\[0\].*\[0\] = param_groups\[0\]\['params'\]\[0\] \('0\.weight_aux'\), "
     r"\[2\] = param_groups\[1\]\['params'\]\[1\] \('0\.weight_aux'\)", _step_case(_param_added_twice))


# groups with different hyper-parameters (or foreach=False, or bf16_sr) are several calls: all are
# validated before the first runs, so the first group is not stepped when the second would fail
def _split(spoil):
    def both(opt, m):
        opt.param_groups[0]["lr"] = 0.02  # group 0 and group 1 now need separate calls
        spoil(opt, m)
    return both


case("AuxAdam.step-split-state-exp_avg-shape", ValueError,
     r"exp_avg\[0\]: expected shape \(2, 4\).*\[0\] = param_groups\[1\]\['params'\]\[0\] \('2\.weight_aux'\)",
     _step_case(_split(_state_value(2, "exp_avg", torch.zeros(3)))))
case("AuxAdam.step-split-moments-aliased", ValueError,
     r"exp_avg_sq of param_groups\[1\]\['params'\]\[0\] \('2\.weight_aux'\): expected memory .* overlaps exp_avg of",
     _step_case(_split(_shared_moments)))
case("AuxAdam.step-split-param-in-two-groups", ValueError,
     r"aux of param_groups\[1\]\['params'\]\[1\] \('0\.weight_aux'\): expected memory .* overlaps aux of "
     r"param_groups\[0\]", _step_case(_split(_param_added_twice)))
case("AuxAdam.step-split-state-expanded", ValueError,
     r"exp_avg of param_groups\[1\]\['params'\]\[0\] \('2\.weight_aux'\): expected a tensor whose elements",
     _step_case(_split(_state_value(2, "exp_avg", torch.zeros(4).expand(2, 4)))))
case("AuxAdam.step-no-foreach-state-exp_avg_sq-shape", ValueError,
     r"exp_avg_sq\[0\]: expected shape \(2, 4\).*'2\.weight_aux'",
     _step_case(_state_value(2, "exp_avg_sq", torch.zeros(8)), foreach=False))


def _bf16_sr_case(spoil):
    def make():
        m = ap.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), aux_dtype=torch.bfloat16)
        opt = AuxAdam.from_model(m, penalty=0.1, memory="bf16_sr")
        _backward(m)
        opt.step()
        _backward(m)
        spoil(opt, m)
        return opt.step, [opt, m]
    return make


case("AuxAdam.step-bf16_sr-lr-inf", ValueError, r"lr: expected a finite float >= 0",
     _bf16_sr_case(_group_value("lr", INF, 0)))
case("AuxAdam.step-bf16_sr-state-shape", ValueError, r"exp_avg\[1\]: expected shape \(2, 4\).*'2\.weight_aux'",
     _bf16_sr_case(_state_value(2, "exp_avg", torch.zeros(3, dtype=torch.bfloat16))))
case("AuxAdam.step-bf16_sr-grad-nan", ValueError, r"grad: expected finite gradients, .*'2\.weight_aux'",
     _bf16_sr_case(_grad_value(2, NAN)))


# ---- convert / finalize --------------------------------------------------------------------------
case("finalize-None", TypeError, r"model: expected a torch\.nn\.Module, got NoneType",
     _construct(lambda: ap.finalize(None)), per_backend=False)
case("convert-None", TypeError, r"model: expected a torch\.nn\.Module, got NoneType",
     _construct(lambda: ap.convert(None)), per_backend=False)
case("sparsity_report-None", TypeError, r"model: expected a torch\.nn\.Module",
     _construct(lambda: ap.sparsity_report(None)), per_backend=False)
case("masked_modules-None", TypeError, r"model: expected a torch\.nn\.Module",
     _construct(lambda: ap.masked_modules(None)), per_backend=False)
case("tied_weights-None", TypeError, r"model: expected a torch\.nn\.Module",
     _construct(lambda: tied_weights(None)), per_backend=False)
case("AuxAdam.from_model-None", TypeError, r"model: expected a torch\.nn\.Module",
     _construct(lambda: AuxAdam.from_model(None)), per_backend=False)


def _finalize(value, *, inplace, layer=2, granularity="weight"):
    def make():
        m = ap.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), granularity=granularity)
        with torch.no_grad():
            m[layer].weight_aux.view(-1)[1] = value
        return (lambda: ap.finalize(m, inplace=inplace)), [m]
    return make


case("finalize-nan-aux", ValueError, r"2\.weight_aux: expected finite values in the masked layer '2'",
     _finalize(NAN, inplace=False), per_backend=False)
case("finalize-inf-aux-inplace", ValueError, r"0\.weight_aux: expected finite values in the masked layer '0'",
     _finalize(INF, inplace=True, layer=0), per_backend=False)
case("finalize-nan-unit-aux-inplace", ValueError, r"2\.weight_aux: expected finite values",
     _finalize(-INF, inplace=True, granularity="unit"), per_backend=False)


# --------------------------------------------------------------------------------------------------
# running the table
# --------------------------------------------------------------------------------------------------
def _run_case(c: Case) -> None:
    call, watched = c.make()
    before = snapshot(watched)
    with pytest.raises(c.exc) as info:
        call()
    assert type(info.value) is c.exc, f"expected exactly {c.exc.__name__}, got {type(info.value).__name__}"
    message = str(info.value)
    assert re.match(c.match, message), f"message does not start with {c.match!r}: {message!r}"
    assert_same(before, snapshot(watched))


BACKEND_CASES = [pytest.param(c, id=c.id) for c in CASES if c.per_backend]
OTHER_CASES = [pytest.param(c, id=c.id) for c in CASES if not c.per_backend]


@pytest.fixture(params=backends.NAMES)
def backend(request):
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"backend {name} not available here: {backends.status().get(name)}")
    with backends.use(name):
        yield name


def test_table_is_large_enough():
    assert len(CASES) >= 100


@pytest.mark.parametrize("c", BACKEND_CASES)
def test_bad_input_per_backend(c, backend):
    _run_case(c)


@pytest.mark.parametrize("c", OTHER_CASES)
def test_bad_input(c):
    _run_case(c)


# --------------------------------------------------------------------------------------------------
# what must keep working: all-meta calls (torch.compile / FakeTensor tracing) and opcheck
# --------------------------------------------------------------------------------------------------
def _samples(device="cpu"):
    def r(*s, dtype=torch.float32):
        return torch.randn(*s, dtype=dtype).to(device)

    w, m, mu, x = r(6, 5), r(6, 5), r(6), r(3, 5)
    a, e1, e2, g = r(6, 5), r(6, 5), r(6, 5).abs(), r(6, 5)
    return {
        "apply_mask": (w, m, "softplus", "sign", 0.1),
        "apply_mask_unit": (w, mu, "leaky_relu", "chain", 0.2),
        "mask_backward": (r(6, 5), w, m, "softplus", "sign", 0.1, True, True),
        "nm_scores": (r(4, 8), 2, 4),
        "masked_linear": (x, w, m, r(6), "softplus", "sign", 0.1),
        "masked_linear_backward": (r(3, 6), x, w, m, "softplus", "sign", 0.1, True, True, True, True),
        "aux_adam_step_": (a, e1, e2, g, r(6, 5), 2, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1e-3, "softplus", 0.1),
        "aux_adam_step_multi_": ([a.clone(), r(3)], [e1.clone(), r(3)], [e2.clone(), r(3).abs()], [g, None],
                                 [None, r(3)], [3, 1], [0.2, 0.0], 1e-2, 0.9, 0.999, 1e-8, 1e-3, "softplus", 0.1),
    }


OPS = ["apply_mask", "apply_mask_unit", "mask_backward", "nm_scores", "masked_linear", "masked_linear_backward",
       "aux_adam_step_", "aux_adam_step_multi_"]


@pytest.mark.parametrize("op", OPS)
def test_all_meta_calls_work(op, backend):
    args = _samples("meta")[op]
    out = getattr(O, op.removesuffix("_unit"))(*args)
    real = _samples("cpu")[op]
    expected = getattr(O, op.removesuffix("_unit"))(*real)
    if out is None:
        assert expected is None
        return
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(outs, exps):
        assert o.device.type == "meta" and o.shape == e.shape and o.dtype == e.dtype


def test_functional_all_meta_calls_work(backend):
    w, m, x = rnd(4, 8, device="meta"), rnd(4, 8, device="meta"), rnd(2, 8, device="meta")
    assert APF.apply_mask(w, m).device.type == "meta"
    assert APF.masked_linear(x, w, m, rnd(4, device="meta")).shape == (2, 4)
    assert APF.apply_nm_mask(w, m, 2, 4).device.type == "meta"
    layer = ap.nn.MaskedConv2d(2, 3, 3, device="meta")
    assert layer(rnd(1, 2, 5, 5, device="meta")).shape == (1, 3, 3, 3)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    torch.library.opcheck(getattr(O, op.removesuffix("_unit")).default, _samples()[op])


def test_compiled_masked_linear_traces_with_checks():
    w, m = torch.randn(4, 3), torch.randn(4, 3)
    f = torch.compile(lambda x: APF.masked_linear(x, w, m), fullgraph=True, backend="eager")
    x = torch.randn(2, 3)
    assert torch.equal(f(x), APF.masked_linear(x, w, m))


# --------------------------------------------------------------------------------------------------
# AuxAdam(nonfinite=...)
# --------------------------------------------------------------------------------------------------
def _opt_state_tensors(opt):
    return [opt, *[p for g in opt.param_groups for p in g["params"]]]


def _state_without_counter(opt):
    snap = snapshot(_opt_state_tensors(opt))
    snap[0] = snap[0][:4] + snap[0][5:]  # all but skipped_steps
    return snap


def test_nonfinite_skip_skips_counts_and_resumes(backend):
    m = _net()
    opt = AuxAdam.from_model(m, penalty=0.1, nonfinite="skip")
    twin = copy.deepcopy(m)
    opt_twin = AuxAdam.from_model(twin, penalty=0.1)
    for model, o in ((m, opt), (twin, opt_twin)):
        torch.manual_seed(1)
        _backward(model)
        o.step()
    # a bad step: skipped, counted, nothing written
    _backward(m)
    m[2].weight_aux.grad.view(-1)[3] = NAN
    before = _state_without_counter(opt)
    assert opt.step() is None
    assert opt.skipped_steps == 1
    assert_same(before, _state_without_counter(opt))
    # inf in another group, with a closure: the loss is still returned
    _backward(m)
    m[0].weight_aux.grad.view(-1)[0] = -INF
    assert opt.step(closure=lambda: torch.tensor(3.0)).item() == 3.0
    assert opt.skipped_steps == 2
    assert_same(before, _state_without_counter(opt))
    # round trip through state_dict, then the next good step equals the twin's, which never saw bad steps
    sd = copy.deepcopy(opt.state_dict())
    assert sd["skipped_steps"] == 2
    m2 = copy.deepcopy(m)
    opt2 = AuxAdam.from_model(m2, penalty=0.1, nonfinite="skip")
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 2
    for model, o in ((m2, opt2), (twin, opt_twin)):
        torch.manual_seed(2)
        _backward(model)
        o.step()
    for (_, x), (_, y) in zip(ap.masked_modules(m2), ap.masked_modules(twin)):
        assert torch.equal(x.weight_aux, y.weight_aux)
        assert opt2.state[x.weight_aux]["step"] == opt_twin.state[y.weight_aux]["step"] == 2
    assert opt2.skipped_steps == 2
    # a state dict without the key (older checkpoints) loads as 0
    old = {k: v for k, v in opt_twin.state_dict().items() if k != "skipped_steps"}
    opt2.load_state_dict(old)
    assert opt2.skipped_steps == 0


def test_nonfinite_skip_on_the_first_step_creates_no_state():
    p = nn.Parameter(torch.randn(5))
    opt = AuxAdam([p], nonfinite="skip")
    p.grad = torch.full((5,), NAN)
    opt.step()
    assert opt.skipped_steps == 1 and p not in opt.state and len(opt.state) == 0


def test_nonfinite_raise_is_the_default_and_writes_nothing(backend):
    m = _net()
    opt = AuxAdam.from_model(m, penalty=0.1)
    assert opt.nonfinite == "raise"
    _backward(m)
    opt.step()
    _backward(m)
    m[0].weight_aux.grad.view(-1)[2] = INF
    before = snapshot(_opt_state_tensors(opt))
    with pytest.raises(ValueError, match=r"^grad: expected finite gradients.*'0\.weight_aux'"):
        opt.step()
    assert_same(before, snapshot(_opt_state_tensors(opt)))
    assert opt.skipped_steps == 0


def test_nonfinite_check_handles_huge_finite_and_empty_gradients():
    p, q = nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(0))
    opt = AuxAdam([p, q], nonfinite="raise")
    p.grad, q.grad = torch.full((3,), 1e300, dtype=torch.float64), torch.zeros(0)
    opt.step()  # finite (the squared norm would overflow; the max-abs test does not)
    assert opt.state[p]["step"] == 1


@pytest.mark.parametrize("scan", ["extension", "sums"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_check_confirms_an_overflowing_sum(dtype, scan, monkeypatch):
    # every entry finite and huge: the CPU test's sum overflows (float32, bfloat16) or would in the
    # gradient's own precision (float16): the step must still run. Both CPU tests: the extension's
    # exact scan and, without the extension, one sum per gradient confirmed entry by entry
    from autoprune_ext import _build, optim

    if scan == "extension" and not _build.load():
        pytest.skip("the C++ extension is not built here")
    if scan == "sums":
        monkeypatch.setattr(optim._build, "loaded", lambda: False)
    p = nn.Parameter(torch.zeros(4, 5, dtype=dtype))
    opt = AuxAdam([p], nonfinite="raise")
    huge = torch.finfo(dtype).max
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low-precision aux warning
        p.grad = torch.full((4, 5), huge, dtype=dtype)
        opt.step()
        assert opt.state[p]["step"] == 1
        # +inf and -inf together sum to NaN; one NaN among huge values: both refused
        for bad in ((INF, -INF), (NAN, 1.0)):
            p.grad = torch.full((4, 5), huge, dtype=dtype)
            p.grad.view(-1)[7], p.grad.view(-1)[11] = bad
            with pytest.raises(ValueError, match=r"^grad: expected finite gradients"):
                opt.step()
    assert opt.state[p]["step"] == 1


def test_load_state_dict_rejects_bad_skipped_steps():
    p = nn.Parameter(torch.randn(2))
    opt = AuxAdam([p])
    sd = opt.state_dict() | {"skipped_steps": -1}
    with pytest.raises(ValueError, match=r"^skipped_steps: expected a non-negative int"):
        opt.load_state_dict(sd)


# --------------------------------------------------------------------------------------------------
# one precision rule for the Adam step (reference = kernels)
# --------------------------------------------------------------------------------------------------
def test_reference_adam_computes_the_penalty_in_float64_when_grad_is_float64():
    """fp32 aux, fp64 grad: the whole step, penalty included, runs in float64, as in the kernels,
    so it equals the float64 step rounded once."""
    torch.manual_seed(3)
    aux, m1, m2 = torch.randn(257), torch.randn(257) * 0.1, torch.randn(257).abs() * 0.1
    grad = torch.randn(257, dtype=torch.float64) * 1e-6
    hp = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=0.37, rho=1e-3,
              surrogate_name="softplus", alpha=0.1)
    a64, e1, e2 = aux.double(), m1.double(), m2.double()
    ref.aux_adam_step_(a64, e1, e2, grad, None, **hp)
    got = aux.clone(), m1.clone(), m2.clone()
    ref.aux_adam_step_(*got, grad, None, **hp)
    for g, e in zip(got, (a64, e1, e2)):
        assert torch.equal(g, e.float())
    assert ref.penalty_grad(aux, 0.37, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("name", [n for n in ("triton", "cpp") if n in AVAILABLE])
def test_mixed_precision_adam_matches_reference(name):
    torch.manual_seed(4)
    base = (torch.randn(129), torch.randn(129) * 0.1, torch.randn(129).abs() * 0.1)
    grad = torch.randn(129, dtype=torch.float64) * 1e-3
    outs = {}
    for b in ("reference", name):
        a, e1, e2 = (t.clone() for t in base)
        with backends.use(b):
            O.aux_adam_step_(a, e1, e2, grad, None, 2, 1e-2, 0.9, 0.999, 1e-8, 0.5, 1e-3, "sigmoid", 0.1)
        outs[b] = (a, e1, e2)
    for x, y in zip(outs["reference"], outs[name]):
        torch.testing.assert_close(x, y, rtol=2e-7, atol=1e-9)
