"""Model surgery: ``convert`` dense layers to masked ones, ``finalize`` back, and ``sparsity_report``."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .nn import AuxInit, MaskedModule, masked_type_for

Selector = str | type[nn.Module]


def _check_model(model: object, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(sel, type):
            if isinstance(module, sel):
                return True
        else:
            raise TypeError(f"include/exclude: expected module-name patterns (str) or module types, got {sel!r}")
    return False


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)
    return root


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedModule]]:
    """``(qualified name, module)`` for every masked layer of ``model``."""
    _check_model(model)
    return ((name, module) for name, module in model.named_modules() if isinstance(module, MaskedModule))


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Parameters held by more than one module of ``model`` (tied weights, e.g. a language model's
    input embedding and ``lm_head``): qualified parameter name -> every module holding it."""
    _check_model(model)
    holders: dict[int, list[str]] = {}
    first: dict[int, str] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            names = holders.setdefault(id(p), [])
            if mod_name not in names:
                names.append(mod_name)
            first.setdefault(id(p), f"{mod_name}.{p_name}" if mod_name else p_name)
    # one module object registered under two names is one layer, not a tie
    ids = {n: id(m) for n, m in model.named_modules(remove_duplicate=False)}
    return {first[k]: v for k, v in holders.items() if len({ids[n] for n in v}) > 1}


def convert(
    model: nn.Module,
    include: Iterable[Selector] | None = None,
    exclude: Iterable[Selector] | None = None,
    granularity: str = "weight",
    init: AuxInit = (0.5, 0.1),
    *,
    surrogate: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    aux_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Swap the ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers of ``model`` for masked ones, in place.

    Only layers of exactly those types are converted (subclasses such as attention's
    ``out_proj`` are used through their weight by their owner, so masking them would be silent
    no-ops), plus Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2 family).
    ``include``/``exclude`` take qualified-name patterns (``fnmatch``: ``"features.*"``)
    or module types; by default every eligible layer is converted. The new layers share the old
    ``weight``/``bias`` parameters. Returns ``model`` (or the new layer, if ``model`` itself is one).

    Tied weights are never masked: a layer whose weight another module also holds (a language
    model's ``lm_head`` tied to its input embedding, see :func:`tied_weights`) stays dense, since a
    mask would apply to one use of the matrix only, and ``finalize`` keeps the tie. Naming only
    tied layers in ``include`` is an error.
    """
    _check_model(model)
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else []
    tied = {id(p) for p in _tied_params(model)}
    names: dict[int, list[str]] = {}  # a module registered under several names is replaced under all
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if masked_type_for(module) is not None
        and (include is None or _matches(name, module, include))
        and not _matches(name, module, exclude)
    ]
    targets = [(n, m) for n, m in selected if id(m.weight) not in tied]
    if include is not None and not targets:
        if selected:
            raise ValueError(
                f"include: {include!r} matches only layers with tied weights ({', '.join(n for n, _ in selected)}), "
                "which are not masked: the mask would apply to one use of the shared matrix only"
            )
        raise ValueError(f"include: no Linear/Conv1d/Conv2d/Conv1D layer of the model matches {include!r}")
    for name, module in targets:
        masked = masked_type_for(module).from_dense(  # type: ignore[union-attr]
            module, granularity=granularity, surrogate=surrogate, rule=rule, alpha=alpha, init=init,
            aux_dtype=aux_dtype,
        )
        for alias in names[id(module)]:
            model = _replace(model, alias, masked)
    return model


def _tied_params(model: nn.Module) -> list[nn.Parameter]:
    tied = tied_weights(model)
    params = dict(model.named_parameters(remove_duplicate=True))
    return [params[n] for n in tied if n in params]


def finalize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Plain dense layers with ``W * h(M)`` baked in, in place of every masked layer.

    The result has the original (unmasked) architecture and ``state_dict`` keys, so it loads into a
    fresh dense model with ``strict=True``. ``model`` itself is left untouched unless ``inplace``.

    A ``DistributedDataParallel`` model is finalized through its ``.module`` (the dense module is
    returned, not a wrapper). An FSDP2-sharded model cannot be copied: use
    :func:`autoprune_ext.distributed.finalize_state_dict`, which gathers the shards and returns the
    dense state dict.

    Raises ``ValueError`` naming the layer when a ``weight_aux`` holds NaN or inf (its mask is
    undefined: ``NaN >= 0`` is false, so it would silently prune), before anything is replaced.
    """
    _check_model(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    from .sparsity import is_dtensor  # here: sparsity imports this module

    if any(is_dtensor(t) for t in (*model.parameters(), *model.buffers())):
        raise TypeError(
            "finalize: the model is sharded (FSDP2 DTensor parameters), which cannot be copied or "
            "replaced layer by layer; use autoprune_ext.distributed.finalize_state_dict(model) (on every "
            "rank) and load the result into a dense model with load_state_dict(..., strict=True)"
        )
    _check_finite_aux(model)
    if not inplace:
        model = copy.deepcopy(model)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for _, module in list(masked_modules(model)):
        dense = module.to_dense()
        for alias in names[id(module)]:
            model = _replace(model, alias, dense)
    return model


@torch.no_grad()
def _check_finite_aux(model: nn.Module) -> None:
    """Every masked layer's ``weight_aux`` is finite (one host sync for the whole model)."""
    layers = [(n, m.weight_aux.detach()) for n, m in masked_modules(model) if m.weight_aux.device.type != "meta"]
    layers = [(n, a) for n, a in layers if a.numel()]
    if not layers:
        return
    dev = layers[0][1].device
    ok = torch.stack([torch.isfinite(a).all().to(dev) for _, a in layers]).tolist()
    for (name, _), good in zip(layers, ok):
        if not good:
            raise ValueError(
                f"{name + '.' if name else ''}weight_aux: expected finite values in the masked layer "
                f"{name or '(the model itself)'!r}, found NaN or inf (its mask is undefined); fix or re-initialise "
                "it (reset_aux) before finalize"
            )


@dataclass
class LayerSparsity:
    """One masked layer of a :class:`SparsityReport`."""

    name: str
    kind: str
    shape: tuple[int, ...]
    kept: int
    total: int
    flops_dense: int
    flops_kept: int

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)

    @property
    def compression(self) -> float:
        return self.total / self.kept if self.kept else float("inf")


@dataclass
class SparsityReport:
    """Per-layer kept/total weights, compression ratio and FLOPs of a masked model.

    FLOPs count 2 per multiply-accumulate per sample, for the masked layers only; without an
    ``example_input`` each layer is counted at one output position (exact for linear layers).
    """

    layers: list[LayerSparsity] = field(default_factory=list)
    flops_exact: bool = False

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.total / self.kept if self.kept else float("inf")

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)

    @property
    def flops_fraction(self) -> float:
        dense = sum(layer.flops_dense for layer in self.layers)
        return sum(layer.flops_kept for layer in self.layers) / dense if dense else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: totals and one entry per layer."""
        layers = []
        for layer in self.layers:
            d = asdict(layer)
            d["shape"] = list(layer.shape)
            d["density"] = layer.density
            d["compression"] = layer.compression
            layers.append(d)
        return {
            "kept": self.kept,
            "total": self.total,
            "density": self.density,
            "compression": self.compression,
            "flops_fraction": self.flops_fraction,
            "flops_exact": self.flops_exact,
            "layers": layers,
        }

    def table(self) -> str:
        """The report as an aligned text table."""
        rows = [("layer", "type", "shape", "kept / total", "density", "compression", "FLOPs kept")]
        for l in self.layers:
            rows.append((
                l.name, l.kind, "x".join(map(str, l.shape)), f"{l.kept:,} / {l.total:,}",
                f"{100 * l.density:.2f}%", f"{l.compression:.1f}x",
                f"{100 * l.flops_kept / l.flops_dense:.1f}%" if l.flops_dense else "-",
            ))
        rows.append((
            "total", "", "", f"{self.kept:,} / {self.total:,}", f"{100 * self.density:.2f}%",
            f"{self.compression:.1f}x", f"{100 * self.flops_fraction:.1f}%",
        ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _positions(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    """Output positions per sample: how many times each weight entry is used for one sample."""
    if isinstance(module, nn.modules.conv._ConvNd):
        batched = inp.dim() == len(module.kernel_size) + 2
    else:
        batched = inp.dim() > 1
    batch = inp.shape[0] if batched else 1
    return max(out.numel() // max(batch * module.weight.shape[0], 1), 1)


def _layer_kind(module: nn.Module) -> str:
    """The layer's class name; FSDP2's ``fully_shard`` swaps in a generated subclass
    (``FSDPMaskedLinear``), so classes defined by ``torch.distributed`` are skipped."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(module).__name__


@torch.no_grad()
def sparsity_report(model: nn.Module, example_input: Tensor | None = None) -> SparsityReport:
    """Kept/total weights, compression ratio and FLOPs estimate of every masked layer of ``model``.

    Pass ``example_input`` (a batch the model accepts) for exact convolution FLOPs: the model is run
    once on it, in eval mode, to record output sizes.

    Counts are global (:func:`autoprune_ext.sparsity.layer_counts`): under FSDP2 the kept entries of
    every rank's shards are summed, so this is collective there (every rank must call it, with the
    same ``example_input``) and every rank gets the whole model's report.
    """
    from .sparsity import layer_counts  # here: sparsity imports this module

    _check_model(model)
    layers = list(masked_modules(model))
    positions: dict[str, int] = {}
    if example_input is not None:
        handles = [
            m.register_forward_hook(lambda mod, i, o, n=n: positions.__setitem__(n, _positions(mod, i[0], o)))
            for n, m in layers
        ]
        was_training = model.training
        model.eval()
        try:
            model(example_input)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    report = SparsityReport(flops_exact=example_input is not None)
    for count in layer_counts(model):
        name, m, kept, total = count.name, count.module, count.kept, count.total
        pos = positions.get(name, 1)
        report.layers.append(LayerSparsity(
            name=name, kind=_layer_kind(m), shape=tuple(m.weight.shape), kept=kept, total=total,
            flops_dense=2 * total * pos, flops_kept=2 * kept * pos,
        ))
    return report
