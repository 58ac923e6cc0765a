"""The masked form of Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2 family layers).

Imported only when a model already holds a ``Conv1D`` (see :func:`autoprune_ext.nn.masked_type_for`),
so this module's top-level import of transformers never happens for users without it.

``Conv1D`` computes ``x @ W + b`` with ``W`` stored transposed, ``[in, out]``. Its ``weight_aux``
follows the mask layout of every other layer, ``[out, in]`` (``[out]`` for unit granularity), so the
ops, the initialisers, N:M groups (along the input dimension) and unit masks (output features) mean
the same thing as for ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from . import functional
from .nn import _MASK_DOC, AuxInit, MaskedModule


class MaskedConv1D(MaskedModule, Conv1D):
    __doc__ = (
        "Drop-in ``transformers.pytorch_utils.Conv1D`` computing ``x @ (W * h(M^T)) + b``; "
        "``weight_aux`` is ``[nf, nx]`` (the transpose of ``weight``).\n" + _MASK_DOC
    )
    dense_cls = Conv1D

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        granularity: str = "weight",
        surrogate: str = "softplus",
        rule: str = "sign",
        alpha: float = 0.1,
        init: AuxInit = (0.5, 0.1),
        aux_dtype: Any = None,
    ) -> None:
        Conv1D.__init__(self, nf, nx)
        self._init_mask(granularity, surrogate, rule, alpha, init, aux_dtype)

    def mask_weight(self) -> Tensor:
        return self.weight.t()

    def to_weight_layout(self, t: Tensor) -> Tensor:
        return t.t()

    def forward(self, x: Tensor) -> Tensor:
        # W^T is the [out, in] weight of a linear layer: one fused masked_linear op, no copy of W
        return functional.masked_linear(x, self.weight.t(), self.effective_aux(), self.bias, **self._mask_options())

    def _dense_kwargs(self) -> dict[str, Any]:
        return {"nf": self.nf, "nx": self.nx}

    def _empty_dense(self) -> nn.Module:
        return _bare_conv1d(Conv1D, self.nf, self.nx)

    @classmethod
    def _empty_masked(cls, module: nn.Module) -> MaskedModule:
        return _bare_conv1d(cls, module.nf, module.nx)  # type: ignore[return-value]


def _bare_conv1d(cls: type, nf: int, nx: int) -> Any:
    """A ``cls`` (``Conv1D`` or a subclass) with ``nf``/``nx`` set and no parameters yet: ``Conv1D``'s
    own constructor would allocate and initialise a weight only to throw it away."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.nf, new.nx = nf, nx
    new.weight = new.bias = None
    return new
