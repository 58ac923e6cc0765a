"""Differentiable masked ops: the functional API of autoprune_ext.

Each function checks its arguments (a clear ``TypeError``/``ValueError`` naming the argument), then
calls one registered op (``torch.ops.autoprune.*``), so the same code runs eagerly, under
``torch.compile`` and on every backend. Plain eager calls take the op layer's fast path (the same
checks and backend code without the custom op's Python dispatch layers; with the ``cpp`` backend on
CPU one native autograd node per call; see ``ops.eager_fast``).
Backward computes the AutoPrune coarse gradient and only the gradients autograd needs: with
``weight`` frozen no ``dW`` work is done, with ``aux`` frozen no ``dM`` work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from . import ops as _ops

_IntOrTuple = int | tuple[int, ...]


def apply_mask(
    weight: Tensor, aux: Tensor, *, surrogate: str = "softplus", rule: str = "sign", alpha: float = 0.1
) -> Tensor:
    """Masked weight ``T = weight * h(aux)`` with ``h(m) = 1 if m >= 0 else 0``.

    Args:
        weight: the weight ``W`` (any float dtype, at least 1-D).
        aux: the auxiliary tensor ``M``: ``W``'s shape, or ``[W.shape[0]]`` for one value per unit.
        surrogate: ``s(m)`` used in place of ``dh/dm`` in backward (see ``reference.SURROGATES``).
        rule: ``"sign"`` (AutoPrune: ``dM = g * sign(W) * s(M)``) or ``"chain"`` (``g * W * s(M)``).
        alpha: slope of the ``leaky_relu`` surrogates.

    Returns:
        ``T``, a new contiguous tensor of ``weight``'s shape and dtype. Backward gives
        ``dW = g * h(M)`` and the coarse ``dM``.
    """
    # the op layer checks every argument (check_finite=True: the functional API's call) and tests aux
    # for NaN/inf, fused into the kernel where the backend can
    return _ops.call_apply_mask(weight, aux, surrogate, rule, alpha, check_finite=True)


def masked_linear(
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    bias: Tensor | None = None,
    *,
    surrogate: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
) -> Tensor:
    """``input @ (weight * h(aux))^T + bias`` for ``input`` of shape ``[..., in_features]``.

    One op: a backend with a mask-fused matmul never writes the masked weight. Options as in
    :func:`apply_mask`.
    """
    return _ops.call_masked_linear(input, weight, aux, bias, surrogate, rule, alpha, check_finite=True)


def _check_conv_args(input: Tensor, weight: Tensor, bias: Tensor | None, dims: int) -> None:
    """What ``F.conv{dims}d`` needs of ``input``/``bias`` beyond the mask pair, as our errors."""
    _checks.check_tensor(input, "input")
    _checks.check_same_device("input", input, "weight", weight)
    if weight.dim() != dims + 2:
        raise ValueError(f"weight: expected a {dims + 2}-D tensor [out_channels, in_channels/groups, *kernel], "
                         f"got shape {tuple(weight.shape)}")
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(f"input: expected a {dims + 1}-D or {dims + 2}-D tensor ([N,] C, *spatial), "
                         f"got shape {tuple(input.shape)}")
    if input.dtype != weight.dtype:
        raise TypeError(f"input: expected dtype {weight.dtype} (that of weight), got {input.dtype}")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
        _checks.check_same_device("bias", bias, "weight", weight)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} (that of weight), got {bias.dtype}")


def masked_conv1d(
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: _IntOrTuple | str = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    surrogate: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
) -> Tensor:
    """``conv1d(input, weight * h(aux), bias, ...)``; arguments as ``torch.nn.functional.conv1d``."""
    _check_conv_args(input, _checks.check_tensor(weight, "weight"), bias, 1)
    t = apply_mask(weight, aux, surrogate=surrogate, rule=rule, alpha=alpha)
    return F.conv1d(input, t, bias, stride, padding, dilation, groups)


def masked_conv2d(
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: _IntOrTuple | str = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    surrogate: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
) -> Tensor:
    """``conv2d(input, weight * h(aux), bias, ...)``; arguments as ``torch.nn.functional.conv2d``."""
    _check_conv_args(input, _checks.check_tensor(weight, "weight"), bias, 2)
    t = apply_mask(weight, aux, surrogate=surrogate, rule=rule, alpha=alpha)
    return F.conv2d(input, t, bias, stride, padding, dilation, groups)


def nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    """N:M scores of ``aux``: ``S >= 0`` exactly on the top-``n`` entries of every group of ``m``
    consecutive entries of each row (ties: lower index kept), ``S`` the distance to the group's
    threshold. Differentiable with a straight-through backward (``dS/dM = 1``), so
    ``apply_mask(W, nm_scores(M, 2, 4))`` is a 2:4-masked weight whose ``M`` learns through the usual
    coarse gradient. See :func:`autoprune_ext.reference.nm_scores`.
    """
    _checks.check_nm_args(aux, n, m)
    _checks.check_finite(aux, "aux")
    return _ops.call_nm_scores(aux, n, m)


def apply_nm_mask(
    weight: Tensor, aux: Tensor, n: int = 2, m: int = 4, *, surrogate: str = "softplus", rule: str = "sign",
    alpha: float = 0.1,
) -> Tensor:
    """``weight * h(nm_scores(aux, n, m))``: an exactly N:M weight (``aux`` in ``weight``'s shape)."""
    _checks.check_tensor(weight, "weight")
    _checks.check_tensor(aux, "aux")
    if aux.shape != weight.shape:
        raise ValueError(
            f"aux: expected weight's shape {tuple(getattr(weight, 'shape', ()))} for N:M granularity, "
            f"got {tuple(getattr(aux, 'shape', ()))}"
        )
    return apply_mask(weight, nm_scores(aux, n, m), surrogate=surrogate, rule=rule, alpha=alpha)
