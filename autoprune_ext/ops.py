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
Fake (meta) implementations give shapes for tracing. The ops check their arguments cheaply (shapes,
dtypes, devices, names); the non-finite test of ``aux`` lives in the functional API.
"""

from __future__ import annotations

import contextlib
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


# --------------------------------------------------------------------------------------------------
# apply_mask / mask_backward
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("autoprune::apply_mask", mutates_args=())
def apply_mask(weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float) -> Tensor:
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    return backends.select(weight.device).apply_mask(weight, aux)


@apply_mask.register_fake
def _(weight, aux, surrogate, rule, alpha):
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
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _checks.check_like(grad, "grad", weight, "weight")
    dW, dM = backends.select(weight.device).mask_backward(
        grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad
    )
    return _or_empty(dW, weight), _or_empty(dM, aux)


@mask_backward.register_fake
def _(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad):
    dW = torch.empty(weight.shape if need_weight_grad else (0,), dtype=weight.dtype, device=weight.device)
    dM = torch.empty(aux.shape if need_aux_grad else (0,), dtype=aux.dtype, device=aux.device)
    return dW, dM


def _apply_mask_setup(ctx, inputs, output) -> None:
    weight, aux, surrogate, rule, alpha = inputs
    ctx.save_for_backward(weight, aux)
    ctx.options = (surrogate, rule, alpha)
    ctx.backend = backends.forced()


def _apply_mask_backward(ctx, grad):
    weight, aux = ctx.saved_tensors
    need_w, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_w or need_m):
        return None, None, None, None, None
    with _backend_scope(ctx.backend):
        dW, dM = torch.ops.autoprune.mask_backward(grad, weight, aux, *ctx.options, need_w, need_m)
    return (dW if need_w else None), (dM if need_m else None), None, None, None


torch.library.register_autograd("autoprune::apply_mask", _apply_mask_backward, setup_context=_apply_mask_setup)


# --------------------------------------------------------------------------------------------------
# nm_scores (N:M granularity)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("autoprune::nm_scores", mutates_args=())
def nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    _checks.check_nm_args(aux, n, m)
    return backends.select(aux.device).nm_scores(aux, n, m)


@nm_scores.register_fake
def _(aux, n, m):
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
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _check_linear_args(input, weight, bias)
    return backends.select(weight.device).masked_linear(input, weight, aux, bias)


@masked_linear.register_fake
def _(input, weight, aux, bias, surrogate, rule, alpha):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


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
    _check_mask_args(weight, aux, surrogate, rule, alpha)
    _check_linear_args(input, weight, None)
    if grad_out.shape != (*input.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"grad_out: expected shape {(*input.shape[:-1], weight.shape[0])}, got {tuple(grad_out.shape)}"
        )
    dX, dW, dM, db = backends.select(weight.device).masked_linear_backward(
        grad_out, input, weight, aux, surrogate, rule, alpha,
        need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
    )
    return _or_empty(dX, input), _or_empty(dW, weight), _or_empty(dM, aux), _or_empty(db, grad_out)


@masked_linear_backward.register_fake
def _(grad_out, input, weight, aux, surrogate, rule, alpha, need_i, need_w, need_m, need_b):
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


def _masked_linear_backward(ctx, grad_out):
    input, weight, aux = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = bool(need[3]) and ctx.bias_dtype is not None
    if not (need[0] or need[1] or need[2] or need_b):
        return None, None, None, None, None, None, None
    with _backend_scope(ctx.backend):
        dX, dW, dM, db = torch.ops.autoprune.masked_linear_backward(
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
def _check_adam_args(
    aux: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor | None, weight: Tensor | None,
    step: int, lr: float, beta1: float, beta2: float, eps: float, surrogate: str, alpha: float,
    index: str = "",
) -> None:
    _checks.check_names(surrogate, "sign", alpha)
    _checks.check_tensor(aux, f"aux{index}")
    _checks.check_like(exp_avg, f"exp_avg{index}", aux, f"aux{index}")
    _checks.check_like(exp_avg_sq, f"exp_avg_sq{index}", aux, f"aux{index}")
    if grad is not None:
        _checks.check_like(grad, f"grad{index}", aux, f"aux{index}")
    if weight is not None:
        _checks.check_like(weight, f"weight{index}", aux, f"aux{index}")
    if step < 1:
        raise ValueError(f"step: expected an integer >= 1, got {step}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas: expected each in [0, 1), got ({beta1}, {beta2})")
    if not (lr >= 0.0 and eps >= 0.0):
        raise ValueError(f"lr, eps: expected non-negative values, got lr={lr}, eps={eps}")


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
    _check_adam_args(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, surrogate, alpha)
    backends.select(aux.device).aux_adam_step_(
        aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha
    )


@aux_adam_step_.register_fake
def _(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha):
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
    n = len(aux)
    for name, seq in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grads", grads),
                      ("weights", weights), ("steps", steps), ("penalty_scales", penalty_scales)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected a list of {n} entries (one per aux tensor), got {len(seq)}")
    if n == 0:
        return
    for i in range(n):
        _check_adam_args(aux[i], exp_avg[i], exp_avg_sq[i], grads[i], weights[i], steps[i],
                         lr, beta1, beta2, eps, surrogate, alpha, index=f"[{i}]")
        _checks.check_same_device(f"aux[{i}]", aux[i], "aux[0]", aux[0])
    backends.select(aux[0].device).aux_adam_step_multi_(
        aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2, eps, rho, surrogate, alpha
    )


@aux_adam_step_multi_.register_fake
def _(aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2, eps, rho, surrogate, alpha):
    return None


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
