"""Pure-PyTorch reference of every AutoPrune op: the specification all backends are tested against.

Shapes. ``weight`` (``W``) is any tensor with at least one dimension. ``aux`` (``M``) has either the
same shape as ``W`` (*weight* granularity) or shape ``[W.shape[0]]`` (*unit* granularity: one value per
output unit / channel, broadcast over the other dimensions of ``W``).

Precision. Arithmetic runs in float32, or float64 when any input is float64; results are cast back to
the dtype of the tensor they belong to (``T``/``dW`` to ``W``'s dtype, ``dM`` to ``M``'s dtype). Every
fused kernel follows the same rule, so comparing against this module is comparing like with like.

Special values. IEEE semantics in the compute dtype, with gradual underflow (no flush-to-zero), and
one rule per case that every backend follows (``tests/test_fuzz.py`` checks them differentially):

* **the mask decision** ``h(m) = m >= 0`` (``apply_mask``, ``dW``, the fused matmuls, the N:M scores,
  the density): ``+0`` and ``-0`` are kept; a subnormal counts with its sign (a negative subnormal is
  pruned, a positive one kept); ``+inf`` is kept, ``-inf`` pruned; NaN is pruned (``NaN >= 0`` is
  False). It is exact -- kernels read it off the sign bit, the magnitude and a NaN test of the bits,
  so a target that flushes subnormals in float compares or conversions cannot change it;
* **M in the surrogates**: the branch tests are ``m > 0`` (leaky_relu, leaky_relu_reversed, relu) and
  ``m >= 0`` (sigmoid's two formulas) with the same sign rule, so a subnormal ``m`` counts with its
  sign (softplus and sigmoid of it equal their value at 0 up to rounding); ``s(+0) == s(-0)`` for
  every surrogate; NaN: softplus and sigmoid give NaN, identity 1, leaky_relu ``alpha``,
  leaky_relu_reversed 1, relu 0; ``+-inf``: softplus ``inf`` / 0, sigmoid 1 / 0, the others by sign.
  The penalty's ``s(-m)`` negates exactly (sign bit);
* **W**: ``T = where(h(M), W, 0)`` copies ``W`` bit for bit (NaN, inf, ``-0``, subnormals) where kept and
  writes ``+0`` where pruned (a pruned NaN/inf weight vanishes; no ``W * 0``). ``c(W)`` for
  ``rule="sign"`` is ``torch.sign``: +-1 for every nonzero non-NaN ``w`` (subnormals and infinities
  included), 0 for ``+-0`` **and for NaN**; ``rule="chain"``: ``c = w`` (NaN/inf propagate).
  ``inv_abs_weight``: ``|w| < 1e-15`` (``+-0``, subnormals) gives no penalty push (0), a NaN ``|w|``
  gives a NaN penalty gradient (``clamp_min`` propagates NaN), ``|w| = inf`` gives ``+-0``;
* **grad** (and every other operand of arithmetic): plain IEEE products and sums, no special cases:
  ``dW = g * h`` is a product, so a NaN/inf ``g`` gives NaN also where pruned (``inf * 0``), and
  ``-g * 0 = -0``; ``dM = (g * c(W)) * s(M)`` (``0 * inf = NaN``); the GEMMs of ``masked_linear`` and the
  unit-granularity row sums propagate NaN/inf (``+inf + -inf = NaN``; an empty row sums to 0, so
  ``dM = 0 * s(M)``); NaN propagates through the Adam step (a NaN ``grad`` makes that entry's
  moments and ``aux`` NaN), and an update of exactly 0 leaves ``aux`` bit-identical (``m - 0 == m``);
* **overflow** happens at the compute dtype's range: float32 for float16/bfloat16/float32 inputs
  (e.g. an Adam update beyond ``3.4e38`` is ``inf``, ``aux`` becomes ``-+inf``), never in a wider
  type; rounding to the output dtype is to nearest even (float64 -> bfloat16 through float32, as
  ``c10::BFloat16``), with overflow to ``+-inf`` and NaN stored as NaN;
* **N:M**: groups are ordered as ``torch.sort(descending=True, stable=True)``: ``-0 == +0`` (ties by
  index, the lower kept), subnormals by value, NaN above ``+inf`` (NaNs tie). A group of finite values
  keeps exactly ``n``; a NaN entry, a NaN threshold or ``inf - inf`` gives NaN scores (pruned);
* **non-finite M**: the functional API and the layers reject it (``check_finite``); the raw
  ``torch.ops.autoprune`` ops accept it and follow the rules above.

The method (``shared/docs/method.md``):

* forward ``T = W * h(M)`` with ``h(m) = 1 if m >= 0 else 0``;
* coarse gradient with ``g = dL/dT``: ``dW = g * h(M)`` and ``dM = g * c(W) * s(M)`` where ``c`` is
  ``sign`` (the AutoPrune rule) or the identity (``chain``) and ``s`` a surrogate *value*;
* density penalty per group ``P = lam * mean h(m) + rho * lam * mean h(-m)`` with gradient
  ``(lam / N) * (s(m) - rho * s(-m))``, optionally scaled by ``1/|w|``;
* the auxiliary Adam step: penalty gradient + Adam moments + bias correction + update of ``M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SURROGATES: tuple[str, ...] = (
    "softplus",
    "sigmoid",
    "identity",
    "leaky_relu",
    "leaky_relu_reversed",
    "relu",
)
RULES: tuple[str, ...] = ("sign", "chain")
GRANULARITIES: tuple[str, ...] = ("weight", "unit")
#: the largest group size ``m`` of N:M granularity (the kernels keep a group in registers)
NM_MAX_M = 32

#: ``inv_abs_weight`` treats weights smaller than this as zero (no penalty push), as the authors did.
INV_ABS_EPS = 1e-15


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the dtype every op computes in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def granularity_of(weight: Tensor, aux: Tensor) -> str:
    """``"weight"`` if ``aux`` has ``weight``'s shape, ``"unit"`` if it has shape ``[weight.shape[0]]``.

    A 1-D weight with a same-sized aux counts as weight granularity (the two coincide).
    """
    if aux.shape == weight.shape:
        return "weight"
    if weight.dim() >= 1 and aux.dim() == 1 and aux.shape[0] == weight.shape[0]:
        return "unit"
    raise ValueError(
        f"aux: expected shape {tuple(weight.shape)} (weight granularity) or "
        f"({weight.shape[0] if weight.dim() else '?'},) (unit granularity), got {tuple(aux.shape)}"
    )


def parse_nm(granularity: object) -> tuple[int, int] | None:
    """``(n, m)`` for an N:M granularity string such as ``"2:4"``; ``None`` for any other string.

    Raises ``ValueError`` for a malformed ``"N:M"`` string or ``1 <= n <= m <= NM_MAX_M`` violated.
    """
    if not isinstance(granularity, str) or ":" not in granularity:
        return None
    a, _, b = granularity.partition(":")
    if not (a.strip().isdigit() and b.strip().isdigit()):
        raise ValueError(f"granularity: expected 'N:M' with integers N and M (e.g. '2:4'), got {granularity!r}")
    n, m = int(a), int(b)
    if not 1 <= n <= m <= NM_MAX_M:
        raise ValueError(f"granularity: expected 'N:M' with 1 <= N <= M <= {NM_MAX_M}, got {granularity!r}")
    return n, m


def nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    """Distance of every entry of ``aux`` to its N:M group's decision boundary: ``S >= 0`` exactly
    for the top-``n`` entries of each group of ``m`` consecutive entries of each row
    (``aux.reshape(aux.shape[0], -1)``; rows must split into whole groups).

    ``S = aux - t`` with ``t`` the midpoint of the group's ``n``-th and ``(n+1)``-th largest values
    (``n == m``: the group's smallest). Ties are broken by position, the lower index kept, and
    ``S`` is clamped to ``>= +0`` for kept entries and ``<= -tiny`` (the dtype's smallest normal) for
    the others, so ``S >= 0`` selects exactly ``n`` per group whatever the ties. Computed in float32
    (float64 for float64 ``aux``), returned in ``aux``'s dtype. Through ``S`` the ordinary ops give
    the N:M forward ``W * h(S)`` and the straight-through coarse gradient ``s(S)`` (``dS/dM = 1``).
    """
    cd = compute_dtype(aux)
    if aux.numel() == 0:
        return torch.empty_like(aux, memory_format=torch.contiguous_format)
    a = aux.to(cd).reshape(-1, m)
    order = torch.sort(a, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order.indices)
    rank.scatter_(1, order.indices, torch.arange(m, device=a.device).expand_as(a).contiguous())
    top = order.values
    thr = top[:, n - 1] if n == m else top[:, n - 1] / 2 + top[:, n] / 2  # halves: no overflow near max
    score = a - thr[:, None]
    tiny = torch.finfo(aux.dtype).tiny
    score = torch.where(rank < n, score.clamp_min(0.0), score.clamp_max(-tiny))
    return score.to(aux.dtype).reshape(aux.shape)


def broadcast_aux(aux: Tensor, weight: Tensor) -> Tensor:
    """View ``aux`` so that it broadcasts against ``weight`` (a no-op for weight granularity)."""
    if granularity_of(weight, aux) == "unit":
        return aux.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1))
    return aux


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``[units, elements per unit]`` (safe for empty tensors)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def indicator(aux: Tensor) -> Tensor:
    """The step function ``h(m) = 1 if m >= 0 else 0``, in ``aux``'s dtype."""
    return (aux >= 0).to(aux.dtype)


def surrogate(m: Tensor, name: str = "softplus", alpha: float = 0.1) -> Tensor:
    """The surrogate value ``s(m)`` that replaces ``dh/dm`` in the coarse gradient."""
    if name == "softplus":
        return F.softplus(m)
    if name == "sigmoid":
        return torch.sigmoid(m)
    if name == "identity":
        return torch.ones_like(m)
    if name in ("leaky_relu", "leaky_relu_reversed"):
        one, a = torch.ones_like(m), torch.full_like(m, alpha)  # alpha in m's precision, not float32
        return torch.where(m > 0, one, a) if name == "leaky_relu" else torch.where(m > 0, a, one)
    if name == "relu":
        return (m > 0).to(m.dtype)
    raise ValueError(f"surrogate: expected one of {SURROGATES}, got {name!r}")


def apply_mask(weight: Tensor, aux: Tensor) -> Tensor:
    """Forward ``T = W * h(M)`` (contiguous, ``weight``'s dtype; exact, since ``h`` is 0 or 1)."""
    keep = broadcast_aux(aux, weight) >= 0
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).contiguous()


def mask_backward(
    grad: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate_name: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    need_weight_grad: bool = True,
    need_aux_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Coarse gradients ``(dW, dM)`` from ``g = dL/dT``; an unrequested one is ``None``.

    ``dW = g * h(M)``; ``dM = g * c(W) * s(M)`` with ``c = sign`` or identity (``rule="chain"``),
    summed over the broadcast dimensions for unit granularity.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    cd = compute_dtype(grad, weight, aux)
    m = broadcast_aux(aux, weight).to(cd)
    g = grad.to(cd)
    dW = dM = None
    if need_weight_grad:
        dW = (g * indicator(m)).to(weight.dtype).contiguous()
    if need_aux_grad:
        w = weight.to(cd)
        gc = g * (torch.sign(w) if rule == "sign" else w)
        if granularity_of(weight, aux) == "unit":
            gc = _rows(gc).sum(dim=1)
            s = surrogate(aux.to(cd), surrogate_name, alpha)
        else:
            s = surrogate(m, surrogate_name, alpha)
        dM = (gc * s).to(aux.dtype).contiguous()
    return dW, dM


def density(auxes: Tensor | Sequence[Tensor]) -> Tensor:
    """Fraction of kept mask entries ``mean h(m)`` over one tensor or a group of tensors."""
    auxes = [auxes] if isinstance(auxes, Tensor) else list(auxes)
    kept = sum(indicator(a.detach()).sum(dtype=torch.float64) for a in auxes)
    total = sum(a.numel() for a in auxes)
    return kept / max(total, 1)


def density_penalty(auxes: Tensor | Sequence[Tensor], lam: float, rho: float = 1e-3) -> Tensor:
    """Value of one group's penalty ``lam * mean h(m) + rho * lam * mean h(-m)`` (for logging)."""
    auxes = [auxes] if isinstance(auxes, Tensor) else list(auxes)
    total = max(sum(a.numel() for a in auxes), 1)
    kept = sum(indicator(a.detach()).sum(dtype=torch.float64) for a in auxes)
    off = sum(indicator(-a.detach()).sum(dtype=torch.float64) for a in auxes)
    return lam * kept / total + rho * lam * off / total


def weight_magnitude(weight: Tensor, aux: Tensor) -> Tensor:
    """``|w|`` in ``aux``'s shape for ``inv_abs_weight``: the weight itself, or each unit's mean ``|W|``."""
    if granularity_of(weight, aux) == "unit":
        return _rows(weight.detach().abs()).mean(dim=1)
    return weight.detach().abs()


def penalty_grad(
    aux: Tensor,
    scale: float,
    rho: float = 1e-3,
    surrogate_name: str = "softplus",
    alpha: float = 0.1,
    weight: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Penalty gradient ``scale * (s(m) - rho * s(-m))`` with ``scale = lam / N`` of the group.

    With ``weight`` (``inv_abs_weight``), the gradient is multiplied by ``1/|w|``, and is 0 where
    ``|w| < 1e-15``. ``weight`` must have ``aux``'s shape (see :func:`weight_magnitude`). The result
    is in ``dtype``, default the compute dtype of ``aux`` and ``weight``.
    """
    cd = dtype if dtype is not None else compute_dtype(aux, weight)
    m = aux.to(cd)
    grad = scale * (surrogate(m, surrogate_name, alpha) - rho * surrogate(-m, surrogate_name, alpha))
    if weight is not None:
        w = weight.to(cd).abs()
        grad = torch.where(w < INV_ABS_EPS, torch.zeros_like(grad), grad / w.clamp_min(INV_ABS_EPS))
    return grad


def aux_adam_step_(
    aux: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor | None,
    weight: Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    penalty_scale: float = 0.0,
    rho: float = 1e-3,
    surrogate_name: str = "softplus",
    alpha: float = 0.1,
) -> None:
    """One in-place Adam step of ``aux`` on ``grad + penalty_grad`` (``step`` counts from 1).

    ``grad`` is the task gradient ``dL/dM`` (``None``: penalty only); ``weight`` enables
    ``inv_abs_weight`` (shape of ``aux``). Matches ``torch.optim.Adam`` (no amsgrad, no decay) on the
    combined gradient; the moments keep their own dtype (float32 for low-precision ``aux``).

    Everything, the penalty gradient included, is computed in float64 when any of ``aux``,
    ``exp_avg``, ``grad``, ``weight`` is float64, else in float32 -- the rule of every fused kernel.
    """
    cd = compute_dtype(aux, exp_avg, grad, weight)
    g = penalty_grad(aux, penalty_scale, rho, surrogate_name, alpha, weight, dtype=cd)
    if grad is not None:
        g = g + grad.to(cd)
    m1 = exp_avg.to(cd).mul(beta1).add_(g, alpha=1 - beta1)
    m2 = exp_avg_sq.to(cd).mul(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    new = aux.to(cd) - (lr / bias1) * m1 / (m2.sqrt() / bias2_sqrt + eps)
    exp_avg.copy_(m1)
    exp_avg_sq.copy_(m2)
    aux.copy_(new)


def masked_linear(input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ (W * h(M))^T + bias`` for inputs of any leading shape."""
    return F.linear(input, apply_mask(weight, aux), bias)


def masked_linear_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate_name: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    need_input_grad: bool = True,
    need_weight_grad: bool = True,
    need_aux_grad: bool = True,
    need_bias_grad: bool = True,
    *,
    apply_mask_fn: Callable[[Tensor, Tensor], Tensor] = apply_mask,
    mask_backward_fn: Callable[..., tuple[Tensor | None, Tensor | None]] = mask_backward,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dX, dW, dM, db)`` of :func:`masked_linear`; unrequested ones are ``None``.

    ``dX = g @ T``, ``dT = g^T X`` (then the coarse rule of :func:`mask_backward`), ``db = sum g``.
    A backend without a fused kernel reuses this composition with its own primitives
    (``apply_mask_fn``, ``mask_backward_fn``).
    """
    tokens = math.prod(input.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous for empty tensors
    g2 = grad_out.reshape(tokens, weight.shape[0])
    dX = dW = dM = db = None
    if need_input_grad:
        dX = torch.mm(g2, apply_mask_fn(weight, aux).to(g2.dtype)).reshape(input.shape)
    if need_weight_grad or need_aux_grad:
        dT = torch.mm(g2.t(), input.reshape(tokens, weight.shape[1]).to(g2.dtype))
        dW, dM = mask_backward_fn(dT, weight, aux, surrogate_name, rule, alpha, need_weight_grad, need_aux_grad)
    if need_bias_grad:
        db = g2.sum(dim=0)
    return dX, dW, dM, db
