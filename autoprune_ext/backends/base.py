"""The backend interface: one method per op of the op layer, with compositions as defaults.

A backend must implement the three elementwise primitives (``apply_mask``, ``mask_backward``,
``aux_adam_step_``); the masked linear ops and the multi-tensor step have default implementations
composed from those primitives and the library GEMM, which a backend overrides when it has something
faster (a mask-fused matmul, a single multi-tensor launch).

Contract shared by every implementation (checked by the tests against :mod:`autoprune_ext.reference`):

* inputs are already validated by the op layer; they may be non-contiguous;
* outputs are new contiguous tensors; ``T``/``dW``/``dX`` in ``weight``'s (``input``'s) dtype and
  ``dM`` in ``aux``'s dtype; arithmetic in float32 (float64 when an input is float64);
* an unrequested gradient is returned as ``None`` and no work is spent on it;
* ``aux_adam_step_`` updates ``aux``, ``exp_avg`` and ``exp_avg_sq`` in place and returns nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .. import _checks, reference

Grads2 = tuple[Tensor | None, Tensor | None]
Grads4 = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


class Backend:
    """Base class of a backend. Subclasses set :attr:`name` and implement the primitives."""

    #: registry name: ``reference``, ``triton`` or ``cpp``
    name: str = ""

    def availability(self, device_type: str) -> tuple[bool, str]:
        """Whether this backend can run ops on tensors of ``device_type`` here, and why not."""
        raise NotImplementedError

    # -- elementwise primitives -------------------------------------------------------------------
    def apply_mask(self, weight: Tensor, aux: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_backward(
        self,
        grad: Tensor,
        weight: Tensor,
        aux: Tensor,
        surrogate: str,
        rule: str,
        alpha: float,
        need_weight_grad: bool,
        need_aux_grad: bool,
    ) -> Grads2:
        raise NotImplementedError

    def aux_adam_step_(
        self,
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
        raise NotImplementedError

    def nm_scores(self, aux: Tensor, n: int, m: int) -> Tensor:
        """N:M scores of ``aux`` (:func:`autoprune_ext.reference.nm_scores`), a new contiguous tensor."""
        raise NotImplementedError

    # -- composed ops (override for speed) ------------------------------------------------------------
    def aux_adam_step_multi_(
        self,
        aux: Sequence[Tensor],
        exp_avg: Sequence[Tensor],
        exp_avg_sq: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        weights: Sequence[Tensor | None],
        steps: Sequence[int],
        penalty_scales: Sequence[float],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        rho: float,
        surrogate: str,
        alpha: float,
    ) -> None:
        """Step many auxiliary tensors; the default loops over :meth:`aux_adam_step_`."""
        for i in range(len(aux)):
            self.aux_adam_step_(
                aux[i], exp_avg[i], exp_avg_sq[i], grads[i], weights[i], steps[i], lr, beta1, beta2, eps,
                penalty_scales[i], rho, surrogate, alpha,
            )

    def masked_linear(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        """``input @ (W * h(M))^T + bias``; the default writes ``T`` then calls the library GEMM."""
        return F.linear(input, self.apply_mask(weight, aux), bias)

    # -- with the functional API's finiteness test of aux (override to fuse it into the kernel) ------
    def apply_mask_checked(self, weight: Tensor, aux: Tensor) -> Tensor:
        """:meth:`apply_mask`, raising ``ValueError("aux: expected finite values, ...")`` if ``aux``
        holds NaN/inf; the default tests first, in a separate pass."""
        _checks.check_finite(aux, "aux")
        return self.apply_mask(weight, aux)

    def masked_linear_checked(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        """:meth:`masked_linear` with the test of :meth:`apply_mask_checked`."""
        _checks.check_finite(aux, "aux")
        return self.masked_linear(input, weight, aux, bias)

    def masked_linear_backward(
        self,
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
    ) -> Grads4:
        """``(dX, dW, dM, db)``; the default composes the GEMMs with :meth:`mask_backward`."""
        return reference.masked_linear_backward(
            grad_out, input, weight, aux, surrogate, rule, alpha,
            need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
            apply_mask_fn=self.apply_mask, mask_backward_fn=self.mask_backward,
        )

    def apply_mask_autograd(self, weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float,
                            check_finite: bool) -> Tensor | None:
        """As :meth:`masked_linear_autograd`, for ``apply_mask`` (:meth:`apply_mask_checked` /
        :meth:`apply_mask` forward, :meth:`mask_backward` backward); ``None`` where there is none."""
        return None

    def masked_linear_autograd(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None, surrogate: str,
                               rule: str, alpha: float, check_finite: bool) -> Tensor | None:
        """The differentiable ``masked_linear`` (forward now, backward recorded) as one native autograd
        node, for the eager fast path; ``None`` where this backend has none (the op layer's Python
        ``autograd.Function`` then runs :meth:`masked_linear_checked` / :meth:`masked_linear` and
        :meth:`masked_linear_backward`, which the native node must match bit for bit). Arguments are
        checked by the caller; ``check_finite``: the forward is :meth:`masked_linear_checked`."""
        return None

    def __repr__(self) -> str:
        return f"<autoprune backend {self.name!r}>"
