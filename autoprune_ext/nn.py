"""Drop-in masked layers: ``MaskedLinear``, ``MaskedConv1d``, ``MaskedConv2d``.

Each is a subclass of the dense layer with one more parameter, ``weight_aux`` (the auxiliary tensor
``M``), and applies the mask inside ``forward`` through one registered op: no hooks, no
parametrizations. So ``state_dict`` keeps ``weight``/``bias`` under their usual names (plus
``weight_aux``), ``deepcopy``/pickle/``torch.save`` work, DDP/FSDP see ordinary parameters, and
``torch.compile(fullgraph=True)`` traces without a graph break.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks, functional
from . import reference as ref

#: an aux initialiser: ``(mean, std)`` of a normal truncated at 2 std, a constant, or
#: a callable ``init(weight, aux_shape) -> Tensor``
AuxInit = tuple[float, float] | float | Callable[[Tensor, tuple[int, ...]], Tensor]


def magnitude_init(keep: float = 1.0, margin: float = 1e-3) -> Callable[[Tensor, tuple[int, ...]], Tensor]:
    """Aux init ``M = |W| - tau`` (unit granularity: each unit's mean ``|W|``) so that the initial
    mask keeps the ``keep`` fraction of largest-magnitude entries. ``margin`` lifts the kept entries
    slightly above zero so they are not on the decision boundary."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")

    def init(weight: Tensor, shape: tuple[int, ...]) -> Tensor:
        mag = weight.detach().abs().float()
        if tuple(shape) != tuple(weight.shape):
            mag = mag.reshape(weight.shape[0], -1).mean(dim=1)
        if keep >= 1.0:
            return mag + margin
        tau = torch.quantile(mag.flatten(), 1.0 - keep)
        return torch.where(mag >= tau, mag - tau + margin, mag - tau - margin)

    return init


class MaskedModule(nn.Module):
    """Behaviour shared by the masked layers (mixed in before the dense layer class)."""

    weight: nn.Parameter
    weight_aux: nn.Parameter
    granularity: str
    surrogate: str
    rule: str
    alpha: float
    #: the dense layer class this one replaces
    dense_cls: type[nn.Module]

    def _init_mask(
        self,
        granularity: str,
        surrogate: str,
        rule: str,
        alpha: float,
        init: AuxInit,
        aux_dtype: torch.dtype | None,
    ) -> None:
        _checks.check_granularity(granularity)
        _checks.check_names(surrogate, rule, alpha)
        self.granularity, self.surrogate, self.rule, self.alpha = granularity, surrogate, rule, float(alpha)
        w = self.mask_weight()
        if aux_dtype is None:
            aux_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        shape = (w.shape[0],) if granularity == "unit" else tuple(w.shape)
        self.weight_aux = nn.Parameter(torch.empty(shape, dtype=aux_dtype, device=w.device))
        nm = ref.parse_nm(granularity)
        if nm is not None:  # rows must split into whole groups of m along the input dimension
            _checks.check_nm_args(w, *nm, aux_name="weight")
        self.reset_aux(init)

    @torch.no_grad()
    def reset_aux(self, init: AuxInit = (0.5, 0.1)) -> None:
        """Re-initialise ``weight_aux`` (default: truncated normal, mean 0.5, std 0.1: all kept)."""
        aux = self.weight_aux
        if callable(init):
            value = init(self.mask_weight().detach(), tuple(aux.shape))
            _checks.check_like(value, "init(weight)", aux, "weight_aux")
            aux.copy_(value)
        elif isinstance(init, (int, float)) and not isinstance(init, bool):
            aux.fill_(float(init))
        elif isinstance(init, tuple) and len(init) == 2 and all(isinstance(v, (int, float)) for v in init):
            mean, std = float(init[0]), float(init[1])
            if std < 0:
                raise ValueError(f"init: expected std >= 0 in (mean, std), got {std}")
            if std == 0:
                aux.fill_(mean)
            else:
                nn.init.trunc_normal_(aux, mean, std, mean - 2 * std, mean + 2 * std)
        else:
            raise TypeError(f"init: expected (mean, std), a float or a callable(weight, shape), got {init!r}")
        _checks.check_finite(aux, "init")

    def _mask_options(self) -> dict[str, Any]:
        return {"surrogate": self.surrogate, "rule": self.rule, "alpha": self.alpha}

    # -- layout: the ops see the weight as [out, in, ...]; a layer storing it otherwise overrides these
    def mask_weight(self) -> Tensor:
        """``weight`` in the mask layout ``[out, in, ...]`` that ``weight_aux`` follows (a view)."""
        return self.weight

    def to_weight_layout(self, t: Tensor) -> Tensor:
        """``t`` (in the mask layout) in ``weight``'s own layout: the inverse of :meth:`mask_weight`."""
        return t

    def effective_aux(self) -> Tensor:
        """The tensor whose sign is the mask: ``weight_aux`` itself, or for N:M granularity its
        distance to each group's top-N threshold (differentiable, straight-through)."""
        nm = ref.parse_nm(self.granularity) if ":" in self.granularity else None
        if nm is None:
            return self.weight_aux
        return functional.nm_scores(self.weight_aux, *nm)

    def mask(self) -> Tensor:
        """Boolean keep-mask in ``weight``'s shape (``True`` = kept)."""
        with torch.no_grad():
            w, aux = self.mask_weight(), self.effective_aux().detach()
            return self.to_weight_layout((ref.broadcast_aux(aux, w) >= 0).expand_as(w))

    @torch.no_grad()
    def masked_weight(self) -> Tensor:
        """``W * h(M)``, detached, in ``weight``'s layout."""
        return self.to_weight_layout(ref.apply_mask(self.mask_weight().detach(), self.effective_aux().detach()))

    def kept(self) -> int:
        """Number of kept weight entries."""
        return int(self.mask().sum())

    def density(self) -> float:
        """Fraction of kept weight entries."""
        return self.kept() / max(self.weight.numel(), 1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, granularity={self.granularity}, surrogate={self.surrogate}, "
            f"rule={self.rule}, alpha={self.alpha}"
        )

    def _dense_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def _empty_dense(self) -> nn.Module:
        """A dense layer of this layer's configuration with no storage (weights set by the caller)."""
        return self.dense_cls(**self._dense_kwargs(), device="meta")

    @classmethod
    def _empty_masked(cls, module: nn.Module) -> MaskedModule:
        """An instance of ``cls`` configured like dense ``module``, without allocating a weight."""
        new = cls.__new__(cls)
        cls.dense_cls.__init__(new, **_dense_kwargs_of(module), device="meta")
        return new

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A plain dense layer holding ``W * h(M)`` (zeros baked in) and the same bias."""
        dense = self._empty_dense()
        dense.weight = nn.Parameter(self.masked_weight().clone(), requires_grad=self.weight.requires_grad)
        if getattr(self, "bias", None) is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        dense.train(self.training)
        return dense

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        *,
        granularity: str = "weight",
        surrogate: str = "softplus",
        rule: str = "sign",
        alpha: float = 0.1,
        init: AuxInit = (0.5, 0.1),
        aux_dtype: torch.dtype | None = None,
    ) -> MaskedModule:
        """Wrap a dense layer. The new layer *shares* ``module``'s weight and bias parameters (so an
        optimiser built on them stays valid) and adds a fresh ``weight_aux``."""
        if type(module) is not cls.dense_cls:
            raise TypeError(f"module: expected a {cls.dense_cls.__name__}, got {type(module).__name__}")
        new = cls._empty_masked(module)
        new.weight = module.weight
        new.bias = module.bias
        new._init_mask(granularity, surrogate, rule, alpha, init, aux_dtype)
        new.train(module.training)
        return new


def _dense_kwargs_of(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}
    assert isinstance(module, nn.modules.conv._ConvNd)
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }


_MASK_DOC = """
    Mask options (keyword-only): ``granularity`` (``"weight"``: one aux entry per weight; ``"unit"``:
    one per output unit; ``"N:M"`` such as ``"2:4"``: one per weight, the mask keeping exactly the
    top-N aux entries of every M consecutive inputs, see :func:`autoprune_ext.functional.nm_scores`), ``surrogate``, ``rule``, ``alpha`` (see :func:`autoprune_ext.functional.apply_mask`),
    ``init`` (aux initialiser, default truncated normal mean 0.5 std 0.1, every weight kept) and
    ``aux_dtype`` (default float32, float64 for float64 weights).
"""


class MaskedLinear(MaskedModule, nn.Linear):
    __doc__ = "Drop-in ``nn.Linear`` computing ``x @ (W * h(M))^T + b`` with a learnable ``weight_aux``.\n" + _MASK_DOC
    dense_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        granularity: str = "weight",
        surrogate: str = "softplus",
        rule: str = "sign",
        alpha: float = 0.1,
        init: AuxInit = (0.5, 0.1),
        aux_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_mask(granularity, surrogate, rule, alpha, init, aux_dtype)

    def forward(self, input: Tensor) -> Tensor:
        return functional.masked_linear(input, self.weight, self.effective_aux(), self.bias, **self._mask_options())

    def _dense_kwargs(self) -> dict[str, Any]:
        return _dense_kwargs_of(self)


class _MaskedConvNd(MaskedModule):
    def forward(self, input: Tensor) -> Tensor:
        functional._check_conv_args(input, self.weight, self.bias, len(self.kernel_size))  # type: ignore[attr-defined]
        t = functional.apply_mask(self.weight, self.effective_aux(), **self._mask_options())
        return self._conv_forward(input, t, self.bias)  # type: ignore[attr-defined]

    def _dense_kwargs(self) -> dict[str, Any]:
        return _dense_kwargs_of(self)


def _conv_init(self: _MaskedConvNd, conv_cls: type[nn.Module], args: tuple, kwargs: dict[str, Any]) -> None:
    mask_keys = ("granularity", "surrogate", "rule", "alpha", "init", "aux_dtype")
    mask_kwargs = {k: kwargs.pop(k) for k in mask_keys if k in kwargs}
    conv_cls.__init__(self, *args, **kwargs)
    defaults = {"granularity": "weight", "surrogate": "softplus", "rule": "sign", "alpha": 0.1,
                "init": (0.5, 0.1), "aux_dtype": None}
    defaults.update(mask_kwargs)
    self._init_mask(**defaults)


class MaskedConv1d(_MaskedConvNd, nn.Conv1d):
    __doc__ = "Drop-in ``nn.Conv1d`` convolving with ``W * h(M)``; the dense layer's arguments.\n" + _MASK_DOC
    dense_cls = nn.Conv1d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _conv_init(self, nn.Conv1d, args, kwargs)


class MaskedConv2d(_MaskedConvNd, nn.Conv2d):
    __doc__ = "Drop-in ``nn.Conv2d`` convolving with ``W * h(M)``; the dense layer's arguments.\n" + _MASK_DOC
    dense_cls = nn.Conv2d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _conv_init(self, nn.Conv2d, args, kwargs)


#: dense layer type -> masked layer type, used by :func:`autoprune_ext.convert`
MASKED_TYPES: dict[type[nn.Module], type[MaskedModule]] = {
    nn.Linear: MaskedLinear,
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
}


def masked_type_for(module: nn.Module) -> type[MaskedModule] | None:
    """The masked layer type that replaces ``module``, or ``None`` if it is not convertible.

    Exactly the types of :data:`MASKED_TYPES`, plus Hugging Face's ``transformers.pytorch_utils.Conv1D``
    (GPT-2 family) when transformers is already imported: a model holding one imported it, so
    transformers is never imported on our account.
    """
    cls = MASKED_TYPES.get(type(module))
    if cls is not None:
        return cls
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and type(module) is getattr(hf, "Conv1D", None):
        from .nn_hf import MaskedConv1D

        return MaskedConv1D
    return None
