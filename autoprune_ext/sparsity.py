"""Counting kept mask entries over a whole model, and keeping layers from collapsing.

Counts are *global*: under FSDP2 each ``weight_aux`` is a DTensor sharded over ranks (``Shard(0)``:
whole rows per rank), and a count over the local shard alone would be a fraction of the truth. Every
function here counts on the local shard and sums over the sharded mesh dimensions, with one
collective per distinct (mesh, placements) however many layers there are. Replicated models (DDP, a
single process) need no collective: every rank holds the whole mask.

The floor (:func:`enforce_floor`) keeps a layer from reaching density 0, which would kill every
gradient flowing through it (a classifier or a transformer projection pruned away entirely).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import reference as ref
from .convert import masked_modules
from .nn import MaskedModule

#: how far above 0 an entry revived by the floor is set (so it is not on the decision boundary)
FLOOR_MARGIN = 1e-3


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def several_processes() -> bool:
    """Whether an initialised ``torch.distributed`` process group has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (aliasing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _shard_groups(t: Tensor) -> list:
    """Process groups over which the local shards of DTensor ``t`` must be summed (its ``Shard`` mesh
    dimensions); empty for a plain tensor or a replicated DTensor."""
    if not is_dtensor(t):
        return []
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(f"weight_aux: expected Shard or Replicate placements, got {t.placements}")
    return groups


def _check_row_sharding(module: MaskedModule) -> None:
    """Unit granularity under sharding needs the weight and its aux sharded the same way on dim 0
    (FSDP2's default): then every rank holds whole rows of both."""
    aux, weight = module.weight_aux, module.weight
    for t, name in ((aux, "weight_aux"), (weight, "weight")):
        if is_dtensor(t) and any(p.is_shard() and p.dim != 0 for p in t.placements):
            raise ValueError(f"{name}: expected sharding on dim 0 only (FSDP2's default), got {t.placements}")


@torch.no_grad()
def _local_kept(module: MaskedModule) -> Tensor:
    """Kept weight entries of ``module`` on this rank's shard, as a 0-d int64 tensor."""
    aux = local(module.weight_aux.detach())
    nm = ref.parse_nm(module.granularity)
    if nm is not None:  # Shard(0) keeps rows, and so N:M groups, whole on every rank
        return (ref.nm_scores(aux, *nm) >= 0).sum()
    if module.granularity == "unit":
        _check_row_sharding(module)
        row = module.weight.numel() // max(module.weight_aux.numel(), 1)  # global sizes: rows are whole on every rank
        return (aux >= 0).sum() * row
    return (aux >= 0).sum()


@torch.no_grad()
def sum_over_shards(values: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """``values[i]`` (a local partial sum belonging to tensor ``like[i]``) summed over the ranks that
    hold shards of ``like[i]``. One collective per distinct sharding; plain tensors pass through."""
    out = list(values)
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(like):
        groups = _shard_groups(t)
        if groups:
            buckets.setdefault(tuple(id(g) for g in groups), []).append(i)
    if not buckets:
        return out
    import torch.distributed as dist

    for idx in buckets.values():
        groups = _shard_groups(like[idx[0]])
        stacked = torch.stack([out[i].reshape(()) for i in idx])
        for g in groups:
            dist.all_reduce(stacked, group=g)
        for j, i in enumerate(idx):
            out[i] = stacked[j]
    return out


@dataclass
class LayerCount:
    """Kept and total weight entries of one masked layer (global over ranks)."""

    name: str
    module: MaskedModule
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)


@torch.no_grad()
def layer_counts(model: nn.Module) -> list[LayerCount]:
    """Kept/total entries of every masked layer of ``model``, over the whole model on every rank.

    Collective under FSDP2 (every rank must call it); one host sync per call.
    """
    layers = list(masked_modules(model))
    if not layers:
        return []
    kept = sum_over_shards([_local_kept(m) for _, m in layers], [m.weight_aux for _, m in layers])
    kept_host = torch.stack([k.to("cpu", torch.int64) for k in kept]).tolist()
    return [LayerCount(name, m, int(k), m.weight.numel()) for (name, m), k in zip(layers, kept_host)]


def density(model: nn.Module) -> float:
    """Fraction of kept entries over every masked layer of ``model`` (global over ranks)."""
    counts = layer_counts(model)
    return sum(c.kept for c in counts) / max(sum(c.total for c in counts), 1)


@torch.no_grad()
def _kth_largest(aux: Tensor, k: int) -> float:
    """The ``k``-th largest value of ``aux`` (a whole, gathered tensor), ``k >= 1``."""
    flat = aux.reshape(-1).float()
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


@torch.no_grad()
def enforce_floor(model: nn.Module, min_density: float = 1e-3, keep_rows: bool = False,
                  counts: Sequence[LayerCount] | None = None) -> list[str]:
    """Revive the largest masked-off entries of every layer below the floor; returns their names.

    * ``min_density``: each layer keeps at least ``ceil(min_density * mask entries)`` entries (at least
      one): where it has fewer, the entries with the largest ``weight_aux`` are set to
      ``max(aux, FLOOR_MARGIN)``, so exactly the best candidates come back and nothing else moves;
    * ``keep_rows`` (weight granularity): every output row keeps at least one entry (its largest).

    Pass ``counts`` from :func:`layer_counts` to skip counting again. Collective under FSDP2, where
    every rank returns the same names (a layer counts as revived when any rank's shard changed).
    """
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(f"min_density: expected a fraction in [0, 1], got {min_density}")
    counts = list(counts) if counts is not None else layer_counts(model)
    flags: list[Tensor] = []  # per layer: whether this rank's shard changed
    for c in counts:
        m = c.module
        aux = m.weight_aux
        if m.granularity not in ("weight", "unit"):
            flags.append(torch.zeros((), dtype=torch.int64, device=aux.device))
            continue  # a fixed pattern (N:M) has a fixed density
        entries = aux.numel()  # mask entries (units for unit granularity)
        per_entry = c.total // max(entries, 1)
        need = max(1, math.ceil(min_density * entries)) if min_density > 0 else 0
        kept_entries = c.kept // max(per_entry, 1)
        changed = False
        if need and kept_entries < need:
            full = aux.detach().full_tensor() if is_dtensor(aux) else aux.detach()
            threshold = _kth_largest(full, min(need, entries))
            la = local(aux.detach())
            la.copy_(torch.where(la >= threshold, la.clamp_min(FLOOR_MARGIN), la))
            changed = True
        if keep_rows and m.granularity == "weight" and aux.dim() >= 2:
            la = local(aux.detach())
            rows = la.reshape(la.shape[0], -1)
            dead = rows.amax(dim=1) < 0
            if bool(dead.any()):
                best = rows.argmax(dim=1)
                r = dead.nonzero().squeeze(1)
                rows[r, best[r]] = FLOOR_MARGIN
                changed = True
        flags.append(torch.tensor(int(changed), dtype=torch.int64, device=aux.device))
    # keep_rows revives rows of the local shard only: agree on the result over the shards
    flags = sum_over_shards(flags, [c.module.weight_aux for c in counts])
    changed_host = torch.stack([f.reshape(()).cpu() for f in flags]).tolist() if flags else []
    return [c.name for c, f in zip(counts, changed_host) if f]
