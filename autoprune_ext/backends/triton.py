"""The ``triton`` backend: fused Triton kernels (:mod:`autoprune_ext.triton_kernels`).

Runs on CUDA tensors when Triton has an active GPU driver, and on CPU tensors through the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported (slow; for tests).
Importing this module never fails: without ``triton``, :func:`make_backend` raises ``ImportError``
and the registry reports the backend as unavailable with that reason.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from torch import Tensor

from .base import Backend, Grads2, Grads4


def _triton_version() -> str | None:
    try:
        import triton

        return getattr(triton, "__version__", "?")
    except Exception:
        return None


class TritonBackend(Backend):
    """Fused elementwise kernels, a one-pass (multi-tensor) Adam step, and a mask-fused matmul."""

    name = "triton"

    def __init__(self) -> None:
        from ..triton_kernels import _common, adam, elementwise, masked_matmul, nm

        self._nm = nm
        self._common = _common
        self._ew = elementwise
        self._adam = adam
        self._mm = masked_matmul

    # -- availability -------------------------------------------------------------------------------
    def availability(self, device_type: str) -> tuple[bool, str]:
        version = _triton_version()
        if version is None:
            return False, "triton is not installed"
        interpreted = self._common.INTERPRETED
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return False, "set TRITON_INTERPRET=1 to run the kernels on CPU (through the Triton interpreter)"
            if not interpreted:
                return False, (
                    "TRITON_INTERPRET=1 was set after the kernels were imported; set it before importing "
                    "autoprune_ext.backends.triton"
                )
            return True, f"triton {version} interpreter on CPU tensors (slow; for testing)"
        if device_type == "cuda":
            import torch

            if not torch.cuda.is_available():
                return False, "no CUDA device"
            try:
                from triton.runtime import driver

                target = driver.active.get_current_target()
            except Exception as exc:  # no driver, broken install, ...
                return False, f"triton has no active GPU driver ({type(exc).__name__}: {exc})"
            if getattr(target, "backend", None) not in ("cuda", "hip"):
                return False, f"triton's active driver targets {getattr(target, 'backend', '?')!r}, not a GPU"
            if interpreted:
                return True, f"triton {version} interpreter (TRITON_INTERPRET=1) on {target.backend} tensors (slow)"
            return True, f"triton {version} on {target.backend} (arch {getattr(target, 'arch', '?')})"
        return False, f"no triton kernels for {device_type!r} tensors"

    # -- elementwise primitives ---------------------------------------------------------------------
    def apply_mask(self, weight: Tensor, aux: Tensor) -> Tensor:
        return self._ew.apply_mask(weight, aux)

    def nm_scores(self, aux: Tensor, n: int, m: int) -> Tensor:
        return self._nm.nm_scores(aux, n, m)

    def mask_backward(self, grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad) -> Grads2:
        return self._ew.mask_backward(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad)

    def aux_adam_step_(
        self, aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha
    ) -> None:
        self._adam.aux_adam_step_(
            aux, exp_avg, exp_avg_sq, grad, weight, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            penalty_scale=penalty_scale, rho=rho, surrogate_name=surrogate, alpha=alpha,
        )

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
        self._adam.aux_adam_step_multi_(
            aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, rho=rho, surrogate_name=surrogate, alpha=alpha,
        )

    # -- masked linear --------------------------------------------------------------------------------
    def masked_linear(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        if not self._mm.supports(input, weight, aux) or (bias is not None and bias.dtype != input.dtype):
            return super().masked_linear(input, weight, aux, bias)  # mixed dtypes: compose
        return self._mm.masked_linear(input, weight, aux, bias)

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
        if not self._mm.supports(input, weight, aux, grad_out):
            return super().masked_linear_backward(
                grad_out, input, weight, aux, surrogate, rule, alpha,
                need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
            )
        return self._mm.masked_linear_backward(
            grad_out, input, weight, aux, surrogate, rule, alpha,
            need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
        )


def make_backend() -> TritonBackend:
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed (pip install 'autoprune_ext[triton]')")
    return TritonBackend()
