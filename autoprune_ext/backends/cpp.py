"""The ``cpp`` backend: C++ CPU kernels and CUDA kernels from ``csrc/`` (ops ``torch.ops.autoprune_cpp.*``).

The kernels live in a compiled library (see :mod:`autoprune_ext._build`): built ahead of time by
``setup.py``, or compiled just in time with ninja and cached under ``~/.cache/autoprune_ext``.

When is it compiled? -- the design choice
-----------------------------------------
Compiling takes 10-40 s on a small machine (a few minutes with the CUDA part), so it must never
happen behind the back of unrelated code that merely calls an op on CPU tensors:

* **Automatic selection** (``AUTO_ORDER`` prefers ``cpp`` on CPU): ``availability("cpu")`` is true when
  the library is loaded or loadable without compiling (ahead-of-time module, or a JIT build already in
  the cache) *or* when it could be compiled (sources, a C++ compiler and ninja are present). In the
  last case nothing is compiled: until the library exists, an automatically chosen ``cpp`` backend
  runs every op with the reference implementation (identical results, as if ``reference`` had been
  picked), and the status line says so. As soon as the library is built (by any of the ways below,
  in this process or an earlier one) the kernels are used.
* **Explicit request**: inside ``with autoprune_ext.backends.use("cpp"):`` or with
  ``AUTOPRUNE_BACKEND=cpp``, the first op compiles the library (one line on stderr: "autoprune_ext:
  compiling the C++ extension (first use, about N s)..."); :func:`build` does the same on demand.
* **Failure**: a failed build or load emits one warning per process and the ops keep running on the
  reference implementation -- never a crash. :func:`build` alone raises, with the reason.
* ``AUTOPRUNE_NO_EXT=1`` switches the extension off entirely (``availability`` is false).

On CUDA tensors ``availability("cuda")`` requires the CUDA part to be compiled into the library and a
GPU; an explicit ``use("cpp")`` compiles it as above (only when torch is a CUDA build and nvcc exists).

``masked_linear`` / ``masked_linear_backward`` are C++ compositions of the fused mask ops with the
library GEMM (registered for every device); ``aux_adam_step_multi_`` is one parallel region on CPU
and a multi-tensor launch on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _build
from .. import reference as ref
from .base import Backend, Grads2, Grads4


def build() -> str:
    """Compile (if needed) and load the C++/CUDA kernels now; returns the library's path.

    Raises :class:`autoprune_ext._build.BuildError` saying why when that is impossible. Clears the
    registry's cached availability so that automatic selection sees the new kernels.
    """
    path = _build.build()
    _clear_registry_cache()
    return path


def _clear_registry_cache() -> None:
    from . import clear_cache

    clear_cache()


def _forced_here() -> bool:
    from . import forced

    return forced() == "cpp"


def _none_if_empty(x: Tensor, wanted: bool) -> Tensor | None:
    return x if wanted else None


class CppBackend(Backend):
    name = "cpp"

    # -- availability -------------------------------------------------------------------------------
    def availability(self, device_type: str) -> tuple[bool, str]:
        if _build.disabled():
            return False, "disabled by AUTOPRUNE_NO_EXT=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"no kernels for {device_type} tensors"
        if device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        ready = _build.load(build=_forced_here())  # compiles only on an explicit request
        if ready and (device_type == "cpu" or _build.has_cuda_kernels()):
            if device_type == "cpu":
                return True, f"C++ CPU kernels ({_build.cpu_isa()}) from {_build.origin()}"
            return True, f"CUDA kernels from {_build.origin()}"
        failed = _build.build_failed(device_type)
        if failed is not None:  # asked for explicitly, build failed: keep running, on the reference
            return True, f"compiling failed, ops run the reference implementation ({failed.splitlines()[0]})"
        if device_type == "cuda":
            if ready:
                return False, (
                    "the compiled extension has no CUDA kernels (built without a CUDA torch or nvcc; "
                    "rebuild where both exist)"
                )
            return False, _build.last_error() or "the C++/CUDA extension is not compiled"
        ok, why = _build.can_build()
        if ok:
            return True, (
                "C++ kernels not compiled yet: ops run the reference implementation until "
                "`backends.use('cpp')` or `autoprune_ext.backends.cpp.build()` compiles them (once, cached)"
            )
        return False, _build.last_error() or why

    def _ready(self, t: Tensor) -> bool:
        """Whether compiled kernels for ``t``'s device can run now; compiles on an explicit request."""
        if not _build.loaded() and _forced_here() and _build.load(build=True):
            _clear_registry_cache()
        if not _build.loaded():
            return False
        return t.device.type == "cpu" or (t.device.type == "cuda" and _build.has_cuda_kernels())

    # -- elementwise primitives -------------------------------------------------------------------
    def apply_mask(self, weight: Tensor, aux: Tensor) -> Tensor:
        if not self._ready(weight):
            return ref.apply_mask(weight, aux)
        return torch.ops.autoprune_cpp.apply_mask(weight, aux, "softplus", "sign", 0.1)

    def nm_scores(self, aux: Tensor, n: int, m: int) -> Tensor:
        if not self._ready(aux):
            return ref.nm_scores(aux, n, m)
        return torch.ops.autoprune_cpp.nm_scores(aux, n, m)

    def mask_backward(
        self, grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad
    ) -> Grads2:
        if not self._ready(weight):
            return ref.mask_backward(grad, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad)
        dW, dM = torch.ops.autoprune_cpp.mask_backward(
            grad, weight, aux, surrogate, rule, float(alpha), bool(need_weight_grad), bool(need_aux_grad)
        )
        return _none_if_empty(dW, need_weight_grad), _none_if_empty(dM, need_aux_grad)

    def aux_adam_step_(
        self, aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha
    ) -> None:
        if not self._ready(aux):
            ref.aux_adam_step_(
                aux, exp_avg, exp_avg_sq, grad, weight, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                penalty_scale=penalty_scale, rho=rho, surrogate_name=surrogate, alpha=alpha,
            )
            return
        torch.ops.autoprune_cpp.aux_adam_step_(
            aux, exp_avg, exp_avg_sq, grad, weight, int(step), float(lr), float(beta1), float(beta2), float(eps),
            float(penalty_scale), float(rho), surrogate, float(alpha),
        )

    # -- composed ops ----------------------------------------------------------------------------------
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
        if not aux or not self._ready(aux[0]):
            return super().aux_adam_step_multi_(
                aux, exp_avg, exp_avg_sq, grads, weights, steps, penalty_scales, lr, beta1, beta2, eps, rho,
                surrogate, alpha,
            )
        torch.ops.autoprune_cpp.aux_adam_step_multi_(
            list(aux), list(exp_avg), list(exp_avg_sq), list(grads), list(weights), [int(s) for s in steps],
            [float(p) for p in penalty_scales], float(lr), float(beta1), float(beta2), float(eps), float(rho),
            surrogate, float(alpha),
        )

    def masked_linear(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        if not self._ready(weight):
            return ref.masked_linear(input, weight, aux, bias)
        return torch.ops.autoprune_cpp.masked_linear(input, weight, aux, bias, "softplus", "sign", 0.1)

    # CPU: the finiteness test of aux rides on the apply_mask pass that reads aux anyway
    def apply_mask_checked(self, weight: Tensor, aux: Tensor) -> Tensor:
        if weight.device.type != "cpu" or not self._ready(weight):
            return super().apply_mask_checked(weight, aux)
        return torch.ops.autoprune_cpp.apply_mask_checked(weight, aux)

    def masked_linear_checked(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
        if weight.device.type != "cpu" or not self._ready(weight):
            return super().masked_linear_checked(input, weight, aux, bias)
        return torch.ops.autoprune_cpp.masked_linear_checked(input, weight, aux, bias)

    # one C++ autograd node (csrc/autograd.cpp): no Python frame in forward or backward, which is most
    # of a small layer's step (about 0.1 ms per layer and step)
    def _native(self, weight: Tensor, name: str) -> Any:
        if weight.device.type != "cpu" or not self._ready(weight):
            return None
        return getattr(torch.ops.autoprune_cpp, name, None)  # absent from a library built before it existed

    def masked_linear_autograd(self, input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None, surrogate: str,
                               rule: str, alpha: float, check_finite: bool) -> Tensor | None:
        op = self._native(weight, "masked_linear_autograd")
        return None if op is None else op(input, weight, aux, bias, surrogate, rule, float(alpha), bool(check_finite))

    def apply_mask_autograd(self, weight: Tensor, aux: Tensor, surrogate: str, rule: str, alpha: float,
                            check_finite: bool) -> Tensor | None:
        op = self._native(weight, "apply_mask_autograd")
        return None if op is None else op(weight, aux, surrogate, rule, float(alpha), bool(check_finite))

    def masked_linear_backward(
        self, grad_out, input, weight, aux, surrogate, rule, alpha,
        need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
    ) -> Grads4:
        if not self._ready(weight):
            return ref.masked_linear_backward(
                grad_out, input, weight, aux, surrogate, rule, alpha,
                need_input_grad, need_weight_grad, need_aux_grad, need_bias_grad,
            )
        dX, dW, dM, db = torch.ops.autoprune_cpp.masked_linear_backward(
            grad_out, input, weight, aux, surrogate, rule, float(alpha),
            bool(need_input_grad), bool(need_weight_grad), bool(need_aux_grad), bool(need_bias_grad),
        )
        return (
            _none_if_empty(dX, need_input_grad),
            _none_if_empty(dW, need_weight_grad),
            _none_if_empty(dM, need_aux_grad),
            _none_if_empty(db, need_bias_grad),
        )


def make_backend() -> CppBackend:
    return CppBackend()
