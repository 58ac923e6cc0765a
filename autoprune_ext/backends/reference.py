"""The ``reference`` backend: :mod:`autoprune_ext.reference` behind the backend interface.

Runs everywhere PyTorch runs (any device, any float dtype) and is the default on CPU.
"""

from __future__ import annotations

from torch import Tensor

from .. import reference as ref
from .base import Backend, Grads2


class ReferenceBackend(Backend):
    name = "reference"

    def availability(self, device_type: str) -> tuple[bool, str]:
        return True, "pure PyTorch, runs on every device"

    def apply_mask(self, weight: Tensor, aux: Tensor) -> Tensor:
        return ref.apply_mask(weight, aux)

    def mask_backward(self, grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad) -> Grads2:
        return ref.mask_backward(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad)

    def aux_adam_step_(
        self, aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha
    ) -> None:
        ref.aux_adam_step_(
            aux, exp_avg, exp_avg_sq, grad, weight, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            penalty_scale=penalty_scale, rho=rho, surrogate_name=surrogate, alpha=alpha,
        )

    def nm_scores(self, aux: Tensor, n: int, m: int) -> Tensor:
        return ref.nm_scores(aux, n, m)

    def masked_linear(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        return ref.masked_linear(input, weight, aux, bias)


def make_backend() -> ReferenceBackend:
    return ReferenceBackend()
