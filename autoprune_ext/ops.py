"""The op layer: every AutoPrune op registered once, under the ``autoprune`` namespace.

Ops (``torch.ops.autoprune.<name>``):

* ``apply_mask(weight, aux, surrogate, rule, alpha) -> T``: differentiable; its backward calls
  ``mask_backward`` asking only for the gradients autograd needs (``surrogate``, ``rule`` and
  ``alpha`` only shape the backward);
* ``mask_backward(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad)
  -> (dW, dM)``: an unrequested gradient comes back as an empty (0-element) tensor, since custom ops
  cannot return ``None``;
* ``aux_adam_step_(aux, exp_avg, exp_avg_sq, grad?, weight?, step, lr, beta1, beta2, eps,
  penalty_scale, rho, surrogate, alpha)``: in place on the first three;
* ``aux_adam_step_multi_(...)``: the same over lists of tensors (one or a few launches);
* ``nm_scores(aux, n, m) -> S``: N:M granularity, ``S >= 0`` exactly on the top-``n`` of every group
  of ``m`` (see :func:`autoprune_ext.reference.nm_scores`); differentiable, straight-through;
* ``masked_linear(input, weight, aux, bias?, surrogate, rule, alpha) -> Y``: differentiable, backward
  through ``masked_linear_backward(...) -> (dX, dW, dM, db)`` (empty tensors for unrequested ones).

Each op's implementation asks :func:`autoprune_ext.backends.select` for the backend at call time, so
backends plug in without touching callers, and ``torch.compile`` sees one opaque op (no graph break).

Validation lives here, once, for every backend: each op checks its arguments (``TypeError`` /
``ValueError`` whose message starts with the argument's name) *before* any backend runs, so no op
fails after writing part of its output or state. The checks are cheap: sizes, strides, dtypes,
devices, storage addresses and Python scalars only -- no device sync, no kernel launch (the
non-finite test of ``aux`` lives in the functional API, that of gradients in ``AuxAdam``). The fake
(meta) implementations, which the dispatcher runs whenever *any* argument is on the meta device (and
``torch.compile`` / ``FakeTensor`` tracing runs always), make the same shape/dtype/device checks, so
a meta tensor mixed with real ones is an error naming the argument, never uninitialised output.

Rules the checks enforce:

* every tensor argument of one call is on one device;
* ``mask_backward``: ``grad`` has ``weight``'s shape and dtype; ``masked_linear_backward``:
  ``grad_out`` has shape ``[*input.shape[:-1], out_features]`` and ``input``'s dtype (autograd hands
  each op's backward a gradient in its output's dtype, which is ``weight``'s / ``input``'s);
* Adam steps: ``exp_avg``/``exp_avg_sq``/``grad``/``weight`` have ``aux``'s shape (any float dtype:
  the arithmetic runs in float64 when any of ``aux``, ``exp_avg``, ``grad``, ``weight`` is float64,
  else in float32, penalty gradient included, on every backend); ``step >= 1``; ``lr``, ``eps``
  finite and ``>= 0``; ``beta1``, ``beta2`` in ``[0, 1)``; ``penalty_scale(s)`` and ``rho`` finite;
  ``alpha`` finite with ``|alpha| <= 1e4`` (:data:`autoprune_ext._checks.ALPHA_MAX`);
* in-place arguments (``aux``, ``exp_avg``, ``exp_avg_sq``) have no internal overlap (no stride-0
  ``expand``), and share no memory with one another or with any ``grad``/``weight`` of the call --
  across all entries of the multi-tensor op (a tensor listed twice is a data race in the fused
  kernels).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks, backends


def _backend_scope(name: str | None) -> contextlib.AbstractContextManager:
    """Re-enter in backward the backend forced during forward: autograd may run backward on its own
    threads, where the thread-local choice of ``backends.use`` is not visible."""
    return backends.use(name) if name is not None else contextlib.nullcontext()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if x is None else x


def _check_mask_args(weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float) -> None:
    _checks.check_names(surrogate, rule, alpha)
    _checks.check_mask_pair(weight, aux, finite=False)


def _check_mask_backward_args(grad, weight, aux, surrogate, rule, alpha) -> None:
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _checks.check_like(grad, "grad", weight, "weight", same_dtype=True)


# --------------------------------------------------------------------------------------------------
# apply_mask / mask_backward
# --------------------------------------------------------------------------------------------------
def _apply_mask_impl(weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float,
                     check_finite: bool = False) -> Tensor:
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    backend = backends.select(weight.device)
    if check_finite and _checks._finite_checks_enabled():
        return backend.apply_mask_checked(weight, aux)
    return backend.apply_mask(weight, aux)


@torch.library.custom_op("autoprune::apply_mask", mutates_args=())
def apply_mask(weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float) -> Tensor:
    return _apply_mask_impl(weight, aux, surrogate, rule, alpha)


@apply_mask.register_fake
def _(weight, aux, surrogate, rule, alpha):
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.custom_op("autoprune::mask_backward", mutates_args=())
def mask_backward(
    grad: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate: str,
    rule: str,
    alpha: float,
    need_weight_grad: bool,
    need_aux_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _mask_backward_impl(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad)


def _mask_backward_impl(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad):
    _check_mask_backward_args(grad, weight, aux, surrogate, rule, alpha)
    dW, dM = backends.select(weight.device).mask_backward(
        grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad
    )
    return _or_empty(dW, weight), _or_empty(dM, aux)


@mask_backward.register_fake
def _(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad):
    _check_mask_backward_args(grad, weight, aux, surrogate, rule, alpha)
    dW = torch.empty(weight.shape if need_weight_grad else (0,), dtype=weight.dtype, device=weight.device)
    dM = torch.empty(aux.shape if need_aux_grad else (0,), dtype=aux.dtype, device=aux.device)
    return dW, dM


def _apply_mask_setup(ctx, inputs, output) -> None:
    weight, aux, surrogate, rule, alpha = inputs
    ctx.save_for_backward(weight, aux)
    ctx.options = (surrogate, rule, alpha)
    ctx.backend = backends.forced()


def _apply_mask_backward(ctx, grad, mask_backward=None):
    weight, aux = ctx.saved_tensors
    need_w, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_w or need_m):
        return None, None, None, None, None
    with _backend_scope(ctx.backend):
        dW, dM = (mask_backward or torch.ops.autoprune.mask_backward)(grad, weight, aux, *ctx.options, need_w, need_m)
    return (dW if need_w else None), (dM if need_m else None), None, None, None


torch.library.register_autograd("autoprune::apply_mask", _apply_mask_backward, setup_context=_apply_mask_setup)


# --------------------------------------------------------------------------------------------------
# nm_scores (N:M granularity)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("autoprune::nm_scores", mutates_args=())
def nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    return _nm_scores_impl(aux, n, m)


def _nm_scores_impl(aux: Tensor, n: int, m: int) -> Tensor:
    _checks.check_nm_args(aux, n, m)
    return backends.select(aux.device).nm_scores(aux, n, m)


@nm_scores.register_fake
def _(aux, n, m):
    _checks.check_nm_args(aux, n, m)
    return torch.empty(aux.shape, dtype=aux.dtype, device=aux.device)


def _nm_scores_setup(ctx, inputs, output) -> None:
    pass


def _nm_scores_backward(ctx, grad):
    # straight-through: the group thresholds are constants, dS/dM = 1
    return grad, None, None


torch.library.register_autograd("autoprune::nm_scores", _nm_scores_backward, setup_context=_nm_scores_setup)


# --------------------------------------------------------------------------------------------------
# masked_linear
# --------------------------------------------------------------------------------------------------
def _check_linear_args(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    _checks.check_tensor(input, "input")
    _checks.check_same_device("input", input, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input: expected shape [..., {weight.shape[1]}] (in_features of weight), got {tuple(input.shape)}"
        )
    if input.dtype != weight.dtype:
        raise TypeError(f"input: expected dtype {weight.dtype} (that of weight), got {input.dtype}")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
        _checks.check_same_device("bias", bias, "weight", weight)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias: expected dtype {input.dtype} (that of input), got {bias.dtype}")


@torch.library.custom_op("autoprune::masked_linear", mutates_args=())
def masked_linear(
    input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None, surrogate: str, rule: str, alpha: float
) -> Tensor:
    return _masked_linear_impl(input, weight, aux, bias, surrogate, rule, alpha)


def _masked_linear_impl(input, weight, aux, bias, surrogate, rule, alpha, check_finite: bool = False) -> Tensor:
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _check_linear_args(input, weight, bias)
    backend = backends.select(weight.device)
    if check_finite and _checks._finite_checks_enabled():
        out = backend.masked_linear_checked(input, weight, aux, bias)
    else:
        out = backend.masked_linear(input, weight, aux, bias)
    # F.linear returns a view of its 2-D result for a 3-D+ input; as the output of an autograd.Function
    # it would refuse in-place ops (nn.ReLU(inplace=True)) that nn.Linear's output and the cpp
    # backend's native node accept: the same storage as a tensor of its own
    return torch.ops.aten._unsafe_view(out, out.shape) if out._is_view() else out


@masked_linear.register_fake
def _(input, weight, aux, bias, surrogate, rule, alpha):
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _check_linear_args(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _check_linear_backward_args(grad_out, input, weight, aux, surrogate, rule, alpha) -> None:
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _check_linear_args(input, weight, None)
    _checks.check_tensor(grad_out, "grad_out")
    _checks.check_same_device("grad_out", grad_out, "weight", weight)
    if grad_out.shape != (*input.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"grad_out: expected shape {(*input.shape[:-1], weight.shape[0])} ([*input.shape[:-1], out_features]), "
            f"got {tuple(grad_out.shape)}"
        )
    if grad_out.dtype != input.dtype:
        raise TypeError(f"grad_out: expected dtype {input.dtype} (that of input), got {grad_out.dtype}")


@torch.library.custom_op("autoprune::masked_linear_backward", mutates_args=())
def masked_linear_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate: str,
    rule: str,
    alpha: float,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_aux_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _masked_linear_backward_impl(grad_out, input, weight, aux, surrogate, rule, alpha,
                                        need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad)


def _masked_linear_backward_impl(grad_out, input, weight, aux, surrogate, rule, alpha,
                                 need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad):
    _check_linear_backward_args(grad_out, input, weight, aux, surrogate, rule, alpha)
    dX, dW, dM, db = backends.select(weight.device).masked_linear_backward(
        grad_out, input, weight, aux, surrogate, rule, alpha,
        need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
    )
    return _or_empty(dX, input), _or_empty(dW, weight), _or_empty(dM, aux), _or_empty(db, grad_out)


@masked_linear_backward.register_fake
def _(grad_out, input, weight, aux, surrogate, rule, alpha, need_i, need_w, need_m, need_b):
    _check_linear_backward_args(grad_out, input, weight, aux, surrogate, rule, alpha)

    def make(flag: bool, shape, like: Tensor) -> Tensor:
        return torch.empty(shape if flag else (0,), dtype=like.dtype, device=like.device)

    return (
        make(need_i, input.shape, input),
        make(need_w, weight.shape, weight),
        make(need_m, aux.shape, aux),
        make(need_b, (weight.shape[0],), grad_out),
    )


def _masked_linear_setup(ctx, inputs, output) -> None:
    input, weight, aux, bias, surrogate, rule, alpha = inputs
    ctx.save_for_backward(input, weight, aux)
    ctx.options = (surrogate, rule, alpha)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backends.forced()


def _masked_linear_backward(ctx, grad_out, linear_backward=None):
    input, weight, aux = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = bool(need[3]) and ctx.bias_dtype is not None
    if not (need[0] or need[1] or need[2] or need_b):
        return None, None, None, None, None, None, None
    with _backend_scope(ctx.backend):
        dX, dW, dM, db = (linear_backward or torch.ops.autoprune.masked_linear_backward)(
            grad_out, input, weight, aux, *ctx.options, need[0], need[1], need[2], need_b
        )
    return (
        dX if need[0] else None,
        dW if need[1] else None,
        dM if need[2] else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "autoprune::masked_linear", _masked_linear_backward, setup_context=_masked_linear_setup
)


# --------------------------------------------------------------------------------------------------
# auxiliary Adam step
# --------------------------------------------------------------------------------------------------
def _check_adam_scalars(lr: float, beta1: float, beta2: float, eps: float, rho: float, surrogate: str,
                        alpha: float) -> None:
    _checks.check_names(surrogate, "sign", alpha)
    _checks.check_scalar(lr, "lr", low=0.0)
    _checks.check_scalar(beta1, "beta1", low=0.0, high=1.0, high_open=True)
    _checks.check_scalar(beta2, "beta2", low=0.0, high=1.0, high_open=True)
    _checks.check_scalar(eps, "eps", low=0.0)
    _checks.check_scalar(rho, "rho")


def _check_adam_tensors(
    aux: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor | None, weight: Tensor | None,
    step: int, penalty_scale: float, index: str, ref_device: tuple[str, Tensor] | None,
) -> None:
    a = _checks.check_tensor(aux, f"aux{index}")
    if ref_device is not None:
        _checks.check_same_device(f"aux{index}", a, *ref_device)
    _checks.check_like(exp_avg, f"exp_avg{index}", a, f"aux{index}")
    _checks.check_like(exp_avg_sq, f"exp_avg_sq{index}", a, f"aux{index}")
    if grad is not None:
        _checks.check_like(grad, f"grad{index}", a, f"aux{index}")
    if weight is not None:
        _checks.check_like(weight, f"weight{index}", a, f"aux{index}")
    if isinstance(step, torch.SymInt):
        pass  # traced (torch.compile): checked at run time by the eager implementation
    elif not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step{index}: expected an integer >= 1, got {step!r}")
    _checks.check_scalar(penalty_scale, f"penalty_scale{index}")


_FLOAT = frozenset(_checks.FLOAT_DTYPES)


def _adam_entry_ok(a, e1, e2, g, w, step, scale, dev) -> bool:
    """Fast path of :func:`_check_adam_tensors` (no message); ``False`` sends to the detailed checks."""
    try:
        if not (a.dtype in _FLOAT and e1.dtype in _FLOAT and e2.dtype in _FLOAT and a.device == dev
                and e1.device == dev and e2.device == dev):
            return False
        shape = a.shape
        if e1.shape != shape or e2.shape != shape:
            return False
        if g is not None and not (g.dtype in _FLOAT and g.device == dev and g.shape == shape):
            return False
        if w is not None and not (w.dtype in _FLOAT and w.device == dev and w.shape == shape):
            return False
        return type(step) is int and step >= 1 and type(scale) in (float, int) and math.isfinite(scale)
    except (AttributeError, TypeError):  # not tensors / not numbers
        return False


def check_aux_adam_step_multi_args(
    aux: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor],
    grads: Sequence[Tensor | None], weights: Sequence[Tensor | None], steps: Sequence[int],
    penalty_scales: Sequence[float], lr: float, beta1: float, beta2: float, eps: float, rho: float,
    surrogate: str, alpha: float, *, memory: bool = True, single: bool = False,
) -> None:
    """Every check of ``aux_adam_step_multi_`` (``single``: of ``aux_adam_step_``, names without
    ``[i]``). ``memory``: also the overlap checks, which need real storage (not in fake kernels).
    Public so that :class:`autoprune_ext.optim.AuxAdam` can validate all its calls of one step before
    it touches any state; the ops run it themselves in any case."""
    n = len(aux)
    for name, seq in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grads", grads),
                      ("weights", weights), ("steps", steps), ("penalty_scales", penalty_scales)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected a list of {n} entries (one per aux tensor), got {len(seq)}")
    _check_adam_scalars(lr, beta1, beta2, eps, rho, surrogate, alpha)
    dev = aux[0].device if n and isinstance(aux[0], Tensor) else None
    for i in range(n):
        if _adam_entry_ok(aux[i], exp_avg[i], exp_avg_sq[i], grads[i], weights[i], steps[i], penalty_scales[i], dev):
            continue
        index = "" if single else f"[{i}]"
        ref = None if i == 0 else ("aux[0]", aux[0])
        _check_adam_tensors(aux[i], exp_avg[i], exp_avg_sq[i], grads[i], weights[i], steps[i], penalty_scales[i],
                            index, ref)
    if memory and n:
        written: list[tuple[_checks.Label, Tensor]] = []
        read: list[tuple[_checks.Label, Tensor]] = []
        for i in range(n):
            index = "" if single else f"[{i}]"
            for name, t in (("aux", aux[i]), ("exp_avg", exp_avg[i]), ("exp_avg_sq", exp_avg_sq[i])):
                _checks.check_no_internal_overlap(t, (name, index))
                written.append(((name, index), t))
            if grads[i] is not None:
                read.append((("grad", index), grads[i]))
            if weights[i] is not None:
                read.append((("weight", index), weights[i]))
        _checks.check_no_overlap(written, read)


def _check_single(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho,
                  surrogate, alpha, memory: bool) -> None:
    check_aux_adam_step_multi_args([aux], [exp_avg], [exp_avg_sq], [grad], [weight], [step], [penalty_scale],
                                   lr, beta1, beta2, eps, rho, surrogate, alpha, memory=memory, single=True)


@torch.library.custom_op("autoprune::aux_adam_step_", mutates_args=("aux", "exp_avg", "exp_avg_sq"))
def aux_adam_step_(
    aux: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor | None,
    weight: Tensor | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    penalty_scale: float,
    rho: float,
    surrogate: str,
    alpha: float,
) -> None:
    _aux_adam_step_impl(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho,
                        surrogate, alpha)


def _aux_adam_step_impl(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho,
                        surrogate, alpha) -> None:
    _check_single(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho,
                  surrogate, alpha, memory=True)
    backends.select(aux.device).aux_adam_step_(
        aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha
    )


@aux_adam_step_.register_fake
def _(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha):
    _check_single(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho,
                  surrogate, alpha, memory=False)
    return None


@torch.library.custom_op(
    "autoprune::aux_adam_step_multi_", mutates_args=("aux", "exp_avg", "exp_avg_sq")
)
def aux_adam_step_multi_(
    aux: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    grads: list[Tensor | None],
    weights: list[Tensor | None],
    steps: list[int],
    penalty_scales: list[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    rho: float,
    surrogate: str,
    alpha: float,
) -> None:
    _aux_adam_step_multi_impl(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2,
                              eps, rho, surrogate, alpha)


def _aux_adam_step_multi_impl(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2,
                              eps, rho, surrogate, alpha) -> None:
    check_aux_adam_step_multi_args(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales,
                                   lr, beta1, beta2, eps, rho, surrogate, alpha, memory=True)
    if not aux:
        return
    backends.select(aux[0].device).aux_adam_step_multi_(
        aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2, eps, rho, surrogate, alpha
    )


@aux_adam_step_multi_.register_fake
def _(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2, eps, rho, surrogate, alpha):
    check_aux_adam_step_multi_args(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales,
                                   lr, beta1, beta2, eps, rho, surrogate, alpha, memory=False)
    return None

# --------------------------------------------------------------------------------------------------
# eager fast path
# --------------------------------------------------------------------------------------------------
# An eager call of a Python custom op runs its autograd, ADInplaceOrView and backend layers in Python:
# about 150 us per call on CPU, which is most of a small layer's step. Plain eager calls skip those
# layers and run the same checks and the same backend code, under a torch.autograd.Function (the
# differentiable ops) or directly with the version bump that the op's ADInplaceOrView layer does (the
# Adam steps). Whatever the dispatcher must see takes the registered op: torch.compile, jit tracing,
# a dispatch or function mode (FakeTensorMode, FlopCounterMode, a device context), functorch
# transforms, tensor subclasses (DTensor, FakeTensor), meta tensors; and AUTOPRUNE_EAGER_FAST=0.


def eager_fast(*tensors: Tensor | None) -> bool:
    """Whether a call with these tensor arguments may take the eager fast path (see above)."""
    if os.environ.get("AUTOPRUNE_EAGER_FAST", "1") == "0":
        return False
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or (type(t) in _checks.PLAIN_TENSOR_TYPES and not t.is_meta) for t in tensors)


# Backward under create_graph (grad mode on) calls the registered backward ops, as the registered
# forward ops do: a higher-order gradient then fails the same way (those ops have no derivative)
# instead of coming out silently wrong.
class _ApplyMaskFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, aux, surrogate, rule, alpha, check_finite):  # type: ignore[override]
        out = _apply_mask_impl(weight, aux, surrogate, rule, alpha, check_finite)
        _apply_mask_setup(ctx, (weight, aux, surrogate, rule, alpha), out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        impl = None if torch.is_grad_enabled() else _mask_backward_impl
        return *_apply_mask_backward(ctx, grad, impl), None


class _NMScoresFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, aux, n, m):  # type: ignore[override]
        return _nm_scores_impl(aux, n, m)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _nm_scores_backward(ctx, grad)


class _MaskedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, aux, bias, surrogate, rule, alpha, check_finite):  # type: ignore[override]
        out = _masked_linear_impl(input, weight, aux, bias, surrogate, rule, alpha, check_finite)
        _masked_linear_setup(ctx, (input, weight, aux, bias, surrogate, rule, alpha), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        impl = None if torch.is_grad_enabled() else _masked_linear_backward_impl
        return *_masked_linear_backward(ctx, grad_out, impl), None


def call_apply_mask(weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float, *,
                    check_finite: bool = False) -> Tensor:
    """``torch.ops.autoprune.apply_mask``, through the eager fast path where allowed.

    ``check_finite``: the functional API's call: check the arguments here (clear errors before the
    op's schema would see a wrong type) and raise ``ValueError`` if ``aux`` holds NaN/inf (on the fast
    path a backend may fuse that test into its kernel)."""
    if eager_fast(weight, aux):
        _check_mask_args(weight, aux, surrogate, rule, alpha)
        alpha = float(alpha)
        out = backends.select(weight.device).apply_mask_autograd(
            weight, aux, surrogate, rule, alpha, check_finite and _checks._finite_checks_enabled())
        if out is not None:  # a native node, as in call_masked_linear
            return out
        return _ApplyMaskFn.apply(weight, aux, surrogate, rule, alpha, check_finite)
    if check_finite:
        _check_mask_args(weight, aux, surrogate, rule, alpha)
        alpha = float(alpha)
        _checks.check_finite(aux, "aux")
    return torch.ops.autoprune.apply_mask(weight, aux, surrogate, rule, alpha)


def call_nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    """``torch.ops.autoprune.nm_scores``, through the eager fast path where allowed."""
    if eager_fast(aux):
        return _NMScoresFn.apply(aux, n, m)
    return torch.ops.autoprune.nm_scores(aux, n, m)


def call_masked_linear(input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None, surrogate: str, rule: str,
                       alpha: float, *, check_finite: bool = False) -> Tensor:
    """``torch.ops.autoprune.masked_linear``, through the eager fast path where allowed
    (``check_finite`` as in :func:`call_apply_mask`)."""
    if eager_fast(input, weight, aux, bias):
        _check_mask_args(weight, aux, surrogate, rule, alpha)
        _check_linear_args(input, weight, bias)
        alpha = float(alpha)
        out = backends.select(weight.device).masked_linear_autograd(
            input, weight, aux, bias, surrogate, rule, alpha, check_finite and _checks._finite_checks_enabled())
        if out is not None:  # a native node: the same kernels and results without Python in the graph
            return out
        return _MaskedLinearFn.apply(input, weight, aux, bias, surrogate, rule, alpha, check_finite)
    if check_finite:  # the functional API's call: the argument checks first, as on the fast path
        _check_mask_args(weight, aux, surrogate, rule, alpha)
        _check_linear_args(input, weight, bias)
        alpha = float(alpha)
        _checks.check_finite(aux, "aux")
    return torch.ops.autoprune.masked_linear(input, weight, aux, bias, surrogate, rule, alpha)


def _fast_inplace(written: Sequence[Tensor], read: Sequence[Tensor | None], ints: Sequence[object],
                  floats: Sequence[object]) -> bool:
    # Calls the registered op would treat differently keep its behaviour: writing a tensor that
    # requires grad while grad mode is on (refused through autograd), and arguments its schema
    # parses (a float step, a bool) rather than our checks.
    if torch.is_grad_enabled() and any(t.requires_grad for t in written if isinstance(t, Tensor)):
        return False
    if not (all(type(v) is int for v in ints) and all(type(v) in (int, float) for v in floats)):
        return False
    return all(isinstance(t, Tensor) for t in written) and eager_fast(*written, *read)


def _bump_versions(tensors: Sequence[Tensor]) -> None:
    for t in tensors:  # what the op's ADInplaceOrView layer does: autograd sees the in-place write
        torch.autograd.graph.increment_version(t)


def call_aux_adam_step_multi_(aux: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor],
                              grads: Sequence[Tensor | None], weights: Sequence[Tensor | None], steps: Sequence[int],
                              penalty_scales: Sequence[float], lr: float, beta1: float, beta2: float, eps: float,
                              rho: float, surrogate: str, alpha: float) -> None:
    """``torch.ops.autoprune.aux_adam_step_multi_``, through the eager fast path where allowed."""
    written = (*aux, *exp_avg, *exp_avg_sq)
    if not _fast_inplace(written, (*grads, *weights), steps, (*penalty_scales, lr, beta1, beta2, eps, rho, alpha)):
        torch.ops.autoprune.aux_adam_step_multi_(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales,
                                                 lr, beta1, beta2, eps, rho, surrogate, alpha)
        return
    _aux_adam_step_multi_impl(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2,
                              eps, rho, surrogate, alpha)
    _bump_versions(written)


def call_aux_adam_step_(aux: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor | None,
                        weight: Tensor | None, step: int, lr: float, beta1: float, beta2: float, eps: float,
                        penalty_scale: float, rho: float, surrogate: str, alpha: float) -> None:
    """``torch.ops.autoprune.aux_adam_step_``, through the eager fast path where allowed."""
    args = (aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha)
    if not _fast_inplace((aux, exp_avg, exp_avg_sq), (grad, weight), (step,),
                         (lr, beta1, beta2, eps, penalty_scale, rho, alpha)):
        torch.ops.autoprune.aux_adam_step_(*args)
        return
    _aux_adam_step_impl(*args)
    _bump_versions((aux, exp_avg, exp_avg_sq))


def op_names() -> Sequence[str]:
    """Qualified names of every registered op (used by the tests and ``autoprune-ext info``)."""
    return (
        "autoprune::apply_mask",
        "autoprune::mask_backward",
        "autoprune::masked_linear",
        "autoprune::masked_linear_backward",
        "autoprune::aux_adam_step_",
        "autoprune::aux_adam_step_multi_",
    )
