"""``AuxAdam``: the optimiser of the auxiliary tensors, with the density penalty fused into the step."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _build, _checks
from . import ops as _ops
from . import reference as ref
from .convert import masked_modules
from .sparsity import is_dtensor, local, several_processes, sum_over_shards

Penalty = float | Mapping[str, float]

#: how a group's ``lambda`` becomes the per-entry penalty scale (see :class:`AuxAdam`)
PENALTY_MODES: tuple[str, ...] = ("mean", "relative")
#: storage of the aux and its Adam moments (see :class:`AuxAdam`)
MEMORY_MODES: tuple[str, ...] = ("standard", "bf16_sr")
#: what a step does when a gradient holds NaN/inf (see :class:`AuxAdam`)
NONFINITE_MODES: tuple[str, ...] = ("raise", "skip")


class AuxAdam(torch.optim.Optimizer):
    """Adam over auxiliary tensors ``M`` whose gradient gets the density penalty added in the same pass.

    Each parameter group is one *penalty group* ``g`` (``shared/docs/method.md`` section 3): the
    step adds ``scale_g * (s(m) - rho * s(-m))`` to ``dL/dM`` (times ``1/|w|`` with
    ``inv_abs_weight``), then applies Adam with bias correction, in place, through the fused op
    ``torch.ops.autoprune.aux_adam_step_multi_`` (one call per device for all groups that share
    ``lr``/``betas``/``eps``/``rho``/``surrogate``/``alpha``).

    The per-entry scale ``scale_g`` comes from the group's ``lambda`` (``penalty``) by its
    ``penalty_mode``:

    * ``"mean"`` (the paper): ``lambda / N_g``, ``N_g`` the group's number of mask entries. The
      penalty is ``lambda`` times the group's density, so its pull on one entry shrinks as the group
      grows: the same ``lambda`` is a strong push on a 10^5-weight layer and almost nothing on a
      10^8-weight one, where task gradients per entry are not 1000x smaller.
    * ``"relative"`` (size-independent): ``lambda * rms(dL/dM)`` over the group at this step (and,
      with ``inv_abs_weight``, times the group's mean ``|w|``, so ``1/|w|`` is relative too).
      ``lambda`` is then the penalty's size in units of the task gradient's: ``lambda = 0.1`` pulls
      every entry down with a tenth of a typical task gradient whatever the layer's size, which is
      what Adam compares entry by entry. Use it for large models; ``0.05``-``1`` is the useful range.

    Memory (``memory``; training bytes per masked weight, aux + its gradient + the two moments):

    * ``"standard"``: fused kernels; moments in float32 (float64 for a float64 aux). 16 bytes with a
      float32 aux. A bfloat16/float16 aux works but silently stalls: an Adam update under half an
      ulp of ``M`` rounds away (a warning says so once).
    * ``"bf16_sr"``: aux and both moments in bfloat16, every write rounded *stochastically* (to one
      of the two neighbouring bfloat16 values, with probabilities that make it exact on average), so
      small updates accumulate instead of vanishing: 8 bytes. The noise is a hash of
      ``(sr_seed, step, parameter index)`` and the entry's index, so a resumed run on the same path
      repeats it exactly. The aux must be bfloat16 (``convert(..., aux_dtype=torch.bfloat16)``). On
      CPU with the extension one C++ pass takes the step; elsewhere PyTorch ops do, with the same
      noise (the two may differ in the last bit of float32 arithmetic, so in rare entries by one
      bfloat16 step; so may CPUs with and without FMA).

    A group may also hold ``layer_scale``: one multiplier per parameter (default ``1.0``), which the
    trainer uses to switch the penalty off for a layer at its density floor.

    Args:
        params: auxiliary parameters or parameter groups (dicts with ``params`` and any option below).
            Build them from a model with :meth:`from_model`, which also wires ``inv_abs_weight``.
        lr, betas, eps: as ``torch.optim.Adam``.
        penalty: the group's ``lambda``. Groups may be changed between steps (a density controller).
        penalty_mode: ``"mean"`` or ``"relative"`` (above).
        rho: weight of the recovery term.
        inv_abs_weight: scale the penalty gradient by ``1/|w|`` (needs the weights: :meth:`from_model`
            or ``weights={aux: weight}``).
        surrogate, alpha: the surrogate of the penalty gradient (use the layers' own).
        foreach: fused multi-tensor calls (``True``) or one call per tensor.
        weights: mapping from each aux parameter to its layer weight (for ``inv_abs_weight``).
        nonfinite: what :meth:`step` does when a gradient holds NaN or inf: ``"raise"`` (default) a
            ``ValueError`` naming the parameter (group index, position and, from :meth:`from_model`,
            the layer's name), or ``"skip"`` the whole step -- no aux, moment or step count changes,
            as AMP's ``GradScaler`` does -- counting it in :attr:`skipped_steps` (saved and restored by
            ``state_dict``/``load_state_dict``). Either way nothing is written before the decision.
            The test is one fused reduction over all gradients and one host sync per step; it is
            off while compiling and with ``AUTOPRUNE_CHECK_FINITE=0``.
        names: mapping from each aux parameter to a name for error messages (set by :meth:`from_model`).

    Validation: every step first re-checks every group's values (they may be changed between
    steps: finite ``lr``/``eps``/``betas``/``penalty``/``rho``/``alpha``/``layer_scale``, the
    non-negative ones non-negative), then the gradients, then the arguments of every fused call it is
    about to make (the op layer's own checks), and only then writes any state, so a failing step
    leaves the optimiser exactly as it was. The same parameter (or two parameters sharing memory) may
    not appear twice, in one group or across groups.

    Parameters whose ``.grad`` is ``None`` are skipped, as in ``torch.optim.Adam``. Parameters may be
    FSDP2 DTensors: the step runs on the local shards (every quantity is elementwise), and the group
    sums behind ``"relative"`` are taken over all ranks.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        penalty: float = 0.0,
        penalty_mode: str = "mean",
        rho: float = 1e-3,
        inv_abs_weight: bool = False,
        surrogate: str = "softplus",
        alpha: float = 0.1,
        foreach: bool = True,
        weights: Mapping[Tensor, Tensor] | None = None,
        memory: str = "standard",
        sr_seed: int = 0,
        nonfinite: str = "raise",
        names: Mapping[Tensor, str] | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: expected one of {NONFINITE_MODES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        #: number of steps skipped because a gradient held NaN/inf (``nonfinite="skip"``)
        self.skipped_steps = 0
        betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas  # checked with the groups
        defaults = dict(lr=lr, betas=betas, eps=eps, penalty=penalty, penalty_mode=penalty_mode, rho=rho,
                        inv_abs_weight=inv_abs_weight, surrogate=surrogate, alpha=alpha, foreach=foreach,
                        memory=memory, sr_seed=sr_seed)
        self._warned_low_precision = False
        # aux -> weight, outside the param groups so that state_dict never stores weight tensors
        self.weights: dict[Tensor, Tensor] = dict(weights or {})
        self.names: dict[Tensor, str] = dict(names or {})
        super().__init__(params, defaults)

    def _param_name(self, gi: int, pi: int, p: Tensor | None = None) -> str:
        where = f"param_groups[{gi}]['params'][{pi}]"
        name = self.names.get(p) if p is not None else None
        return f"{where} ({name!r})" if name else where

    def _check_group(self, group: dict[str, Any], gi: int) -> None:
        """Every value of ``group`` (index ``gi``); run at construction, by ``add_param_group`` and at
        the start of every step (a controller or a user may have changed them)."""
        where = f" (param_groups[{gi}])"

        def scalar(key: str, **kw: Any) -> None:
            try:
                _checks.check_scalar(group[key], key, **kw)
            except ValueError as exc:
                raise ValueError(f"{exc}{where}") from None

        scalar("lr", low=0.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0.0 <= b < 1.0
                for b in betas)):
            raise ValueError(f"betas: expected two floats in [0, 1), got {betas!r}{where}")
        scalar("eps", low=0.0)
        scalar("penalty", low=0.0)
        scalar("rho", low=0.0)
        try:
            _checks.check_names(group["surrogate"], "sign", group["alpha"])
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
        if group["memory"] not in MEMORY_MODES:
            raise ValueError(f"memory: expected one of {MEMORY_MODES}, got {group['memory']!r}")
        if group["memory"] == "bf16_sr":
            wrong = [tuple(p.shape) for p in group["params"] if p.dtype != torch.bfloat16]
            if wrong:
                raise TypeError(f"memory: 'bf16_sr' needs bfloat16 aux tensors "
                                f"(convert(..., aux_dtype=torch.bfloat16)); got other dtypes for shapes {wrong}")
        if not isinstance(group["sr_seed"], int) or isinstance(group["sr_seed"], bool):
            raise TypeError(f"sr_seed: expected an int, got {type(group['sr_seed']).__name__}")
        if group["penalty_mode"] not in PENALTY_MODES:
            raise ValueError(f"penalty_mode: expected one of {PENALTY_MODES}, got {group['penalty_mode']!r}")
        scales = group.setdefault("layer_scale", [1.0] * len(group["params"]))
        if not (isinstance(scales, (list, tuple)) and len(scales) == len(group["params"]) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in scales)):
            raise ValueError(
                f"layer_scale: expected {len(group['params'])} finite non-negative floats (one per parameter), "
                f"got {scales!r}{where}"
            )
        if group["inv_abs_weight"]:
            missing = [tuple(p.shape) for p in group["params"] if p not in self.weights]
            if missing:
                raise ValueError(
                    f"inv_abs_weight: needs the layer weight of every aux tensor (use AuxAdam.from_model "
                    f"or weights={{aux: weight}}); missing for aux tensors of shapes {missing}"
                )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        penalty: Penalty = 0.0,
        penalty_mode: str = "mean",
        rho: float = 1e-3,
        inv_abs_weight: bool = False,
        foreach: bool = True,
        per_layer: Iterable[str] = (),
        memory: str = "standard",
        sr_seed: int = 0,
        nonfinite: str = "raise",
    ) -> AuxAdam:
        """One optimiser over every masked layer of ``model``, grouped by penalty.

        ``penalty`` is one ``lambda`` for all layers (one group), or a mapping whose keys are
        ``"linear"`` / ``"conv"`` (the method's two default groups) or qualified-name patterns
        (``fnmatch``, e.g. ``"features.0"``: one group each; patterns win over the type keys).
        Layers matched by no key get no penalty. The surrogate and alpha come from the layers.
        N:M layers form a group ``"n:m"`` without penalty (their density is fixed).
        Layers named in ``per_layer`` get a group of their own (named after the layer, with the
        ``lambda`` their key gives): what a per-layer density controller adjusts.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        per_layer = set(per_layer)
        groups: dict[tuple[str, str, float], dict[str, Any]] = {}
        weights: dict[Tensor, Tensor] = {}
        names: dict[Tensor, str] = {}
        for name, module in masked_modules(model):
            key, lam = _penalty_key(name, module, penalty)
            if name in per_layer:
                key = name
            if ":" in module.granularity:  # N:M: the density is fixed, a density penalty has nothing to do
                key, lam = "n:m", 0.0
            gkey = (key, module.surrogate, module.alpha)
            group = groups.setdefault(gkey, {"params": [], "penalty": lam, "surrogate": module.surrogate,
                                             "alpha": module.alpha, "name": key})
            group["params"].append(module.weight_aux)
            weights[module.weight_aux] = module.mask_weight()  # [out, in, ...], as weight_aux
            names[module.weight_aux] = f"{name}.weight_aux" if name else "weight_aux"
        if not groups:
            raise ValueError("model: has no masked layers; call autoprune_ext.convert(model) first")
        return cls(list(groups.values()), lr, betas, eps, penalty_mode=penalty_mode, rho=rho,
                   inv_abs_weight=inv_abs_weight, foreach=foreach, weights=weights, memory=memory, sr_seed=sr_seed,
                   nonfinite=nonfinite, names=names)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, and rejects (``ValueError``) a parameter listed
        twice or sharing memory with another parameter of this optimiser (the fused multi-tensor step
        would race on it), and invalid group values; a rejected group is not added."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, (set, str)):
            params = list(params)
        if isinstance(params, list):
            param_group = {**param_group, "params": params}
            self._check_distinct(params)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            self._check_group(self.param_groups[gi], gi)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_distinct(self, params: list[Any]) -> None:
        gi = len(self.param_groups)
        seen: dict[int, str] = {}
        existing: list[tuple[str, Tensor]] = []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                seen[id(p)] = self._param_name(g, i, p)
                existing.append((self._param_name(g, i, p), local(p)))
        new: list[tuple[str, Tensor]] = []
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor):
                p = p[1]  # (name, parameter), as named_parameters() gives
            if not isinstance(p, Tensor):
                continue  # torch's add_param_group says what is wrong
            here = self._param_name(gi, i, p)
            if id(p) in seen:
                raise ValueError(f"params: expected distinct parameters, got the same tensor twice: {here} is "
                                 f"{seen[id(p)]} (the fused step would update it twice, racing with itself)")
            seen[id(p)] = here
            new.append((here, local(p)))
        try:
            _checks.check_no_overlap(existing + new)
        except ValueError as exc:
            raise ValueError(f"params: expected parameters that share no memory; {exc}") from None

    def _magnitude(self, aux: Tensor) -> Tensor:
        w = local(self.weights[aux].detach())
        # weight granularity: the kernels take |w| themselves, so pass W without a temporary
        return w if w.shape == local(aux).shape else ref.weight_magnitude(w, local(aux))

    @torch.no_grad()
    def _scales(self) -> list[float]:
        """``scale_g`` of every group (see the class docstring); one host sync for all groups."""
        scales: list[float] = []
        relative: list[tuple[int, Tensor, Tensor | None]] = []  # group, sum of grad^2, sum of |w|
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            total = sum(p.numel() for p in params)  # global: DTensor.numel() is the full size
            lam = float(group["penalty"])
            scales.append(lam / total if total else 0.0)
            if group["penalty_mode"] != "relative" or lam == 0.0 or not total:
                continue
            with_grad = [p for p in params if p.grad is not None]
            sq = _global_sum([local(p.grad).double().square().sum() for p in with_grad], with_grad)
            mag = None
            if group["inv_abs_weight"]:
                ws = [self.weights[p].detach() for p in params]
                mag = _global_sum([local(w).double().abs().sum() for w in ws], ws) / sum(w.numel() for w in ws)
            relative.append((gi, sq, mag))
        if relative:
            pairs = [torch.stack([sq, mag if mag is not None else torch.ones_like(sq)]) for _, sq, mag in relative]
            host = torch.stack([pair.to(pairs[0].device) for pair in pairs]).tolist()
            for (gi, _, _), (sq, mag) in zip(relative, host):
                total = sum(p.numel() for p in self.param_groups[gi]["params"])
                scales[gi] = float(self.param_groups[gi]["penalty"]) * (sq / total) ** 0.5 * mag
        return scales

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus ``"skipped_steps"``."""
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; restores :attr:`skipped_steps` (0 if absent)."""
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, Tensor) and skipped.numel() == 1:
            skipped = int(skipped.item())
        if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
            raise ValueError(f"skipped_steps: expected a non-negative int in the state dict, got {skipped!r}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "skipped_steps"})
        self.skipped_steps = skipped

    @torch.no_grad()
    def _nonfinite_grad(self) -> tuple[int, int, Tensor] | None:
        """``(group, position, param)`` of the first parameter whose gradient holds NaN/inf, or ``None``.

        On CPU with the C++ extension loaded: one call (``autoprune_cpp::nonfinite_indices``) tests
        every gradient's exponent bits, exactly and in one parallel pass. Otherwise one reduction per
        gradient (a sum on CPU; on GPU ``torch._foreach_norm``, one launch per (device, dtype) bucket)
        and one host sync in all; a non-finite result is confirmed entry by entry (huge finite
        gradients may overflow it; only then is there more work). Sharded (DTensor) gradients are
        combined over the ranks, so every rank decides alike.
        """
        if not _checks._finite_checks_enabled():
            return None
        entries = [(gi, pi, p) for gi, group in enumerate(self.param_groups)
                   for pi, p in enumerate(group["params"]) if p.grad is not None]
        grads = [local(p.grad) for _, _, p in entries]
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, g in enumerate(grads):
            if g.numel() and not g.is_meta:
                buckets.setdefault((g.device, g.dtype), []).append(k)
        bad: list[int] = []
        if buckets:
            totals, order = [], []  # one finite-iff-finite reduction per gradient
            for (dev, dtype), ks in buckets.items():
                scan = _nonfinite_scan() if dev.type == "cpu" else None
                if scan is not None and all(type(grads[k]) in _checks.PLAIN_TENSOR_TYPES for k in ks):
                    # exact and without temporaries: a small model's few gradients cost one call
                    # instead of a sum each, a stack and a sync
                    bad += [ks[i] for i in scan([grads[k] for k in ks])]
                    continue
                if dev.type == "cpu":
                    # a sum is finite exactly when every entry is finite, barring overflow (confirmed
                    # below), and costs a third of a norm here (one add per entry; CPU foreach ops
                    # loop over the tensors anyway). Half types are summed in float32: their sums
                    # overflow early.
                    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
                    totals.append(torch.stack([grads[k].sum(dtype=acc) for k in ks]).float())
                else:  # one fused launch on GPU
                    totals.append(torch.stack(torch._foreach_norm([grads[k] for k in ks])).float())
                order.extend(ks)
            if totals:
                dev = totals[0].device
                host = torch.cat([t.to(dev) for t in totals]).tolist()  # the one host sync
                suspects = [k for k, v in zip(order, host) if not math.isfinite(v)]
                bad += [k for k in suspects if not bool(torch.isfinite(grads[k]).all())]  # an overflow is no NaN/inf
        sharded = [k for k, (_, _, p) in enumerate(entries) if is_dtensor(p.grad)]
        if sharded:  # agree over the ranks: every rank reduces the same entries in the same order
            dev = grads[sharded[0]].device
            flags = torch.tensor([float(k in bad) for k in sharded], device=dev).unbind()
            reduced = sum_over_shards(list(flags), [entries[k][2].grad for k in sharded])
            host = torch.stack([v.reshape(()).to(dev) for v in reduced]).tolist()
            bad = sorted(set(bad) | {k for k, v in zip(sharded, host) if v != 0.0})
        return entries[min(bad)] if bad else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One fused penalty + Adam step of every auxiliary tensor that has a gradient.

        Validates everything first (group values, gradients, the fused calls' arguments), then writes
        state; on an error or a skipped step (``nonfinite="skip"``) nothing has changed. Groups that
        share ``lr``, ``betas``, ``eps``, ``rho``, ``surrogate`` and ``alpha`` (and a device) are
        stepped by one fused call.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        bad = self._nonfinite_grad()
        if bad is not None:
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            gi, pi, p = bad
            raise ValueError(
                f"grad: expected finite gradients, found NaN or inf in the gradient of {self._param_name(gi, pi, p)}; "
                "nothing was updated (AuxAdam(..., nonfinite='skip') skips such steps instead)"
            )
        calls = self._plan(self._scales())
        # One fused call validates its own arguments before writing anything; several calls (or the
        # per-tensor and bf16_sr paths) are all validated up front, so none runs if any would fail.
        if len(calls) > 1 or any(c["kind"] != "fused" for c in calls):
            self._validate(calls)
        for call in calls:
            self._run(call)
        for call in calls:  # the steps ran: record them
            for e in call["entries"]:
                if e["fresh"] is not None:
                    self.state[e["p"]] = e["fresh"]
                self.state[e["p"]]["step"] += 1
        return loss

    def _plan(self, scales: list[float]) -> list[dict[str, Any]]:
        """The calls of one step, without writing any state (fresh moments are not stored yet)."""
        calls: dict[tuple, dict[str, Any]] = {}
        for gi, (group, group_scale) in enumerate(zip(self.param_groups, scales)):
            beta1, beta2 = group["betas"]
            hp = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["rho"]),
                  group["surrogate"], float(group["alpha"]))
            kind = "sr" if group["memory"] == "bf16_sr" else ("fused" if group["foreach"] else "single")
            inv_abs = group["inv_abs_weight"]
            for pi, (p, layer_scale) in enumerate(zip(group["params"], group["layer_scale"])):
                if p.grad is None:
                    continue
                key = (kind, p.device, hp) if kind == "fused" else (kind, p.device, hp, gi)
                call = calls.setdefault(key, {"kind": kind, "hp": hp, "entries": []})
                state, fresh, step, exp_avg, exp_avg_sq = self._state_of(p, gi, pi, kind)
                # DTensor (FSDP2): the step is elementwise, so it runs on the local shards in place
                call["entries"].append({
                    "gi": gi, "pi": pi, "p": p, "fresh": fresh, "seed_base": group["sr_seed"],
                    "aux": local(p), "exp_avg": local(exp_avg), "exp_avg_sq": local(exp_avg_sq),
                    "grad": local(p.grad), "weight": self._magnitude(p) if inv_abs else None,
                    "step": step + 1, "scale": group_scale * float(layer_scale),
                })
        return list(calls.values())

    def _state_of(self, p: Tensor, gi: int, pi: int, kind: str) -> tuple[dict, dict | None, int, Tensor, Tensor]:
        """``(state, fresh, step, exp_avg, exp_avg_sq)`` of parameter ``p`` (group ``gi``, position ``pi``),
        checked; ``fresh`` is a new zero state (not stored yet) when ``p`` has none."""
        state = self.state.get(p)
        fresh = None
        if not state:
            moment_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            if kind == "sr":
                moment_dtype = torch.bfloat16
            fresh = state = {
                "step": 0,
                "exp_avg": torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format),
            }
        step = state.get("step")
        if isinstance(step, Tensor) and step.numel() == 1:
            step = int(step.item())
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step: expected a non-negative int in the state of "
                             f"{self._param_name(gi, pi, p)}, got {step!r}")
        exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
        if not (isinstance(exp_avg, Tensor) and isinstance(exp_avg_sq, Tensor)):
            raise TypeError(f"exp_avg, exp_avg_sq: expected tensors in the state of "
                            f"{self._param_name(gi, pi, p)}, got {type(exp_avg).__name__}, "
                            f"{type(exp_avg_sq).__name__}")
        return state, fresh, step, exp_avg, exp_avg_sq

    @contextlib.contextmanager
    def fused_step(self) -> Iterator[None]:
        """Take this optimiser's step inside the backward run in the ``with`` block, where it can.

        ``with aux_opt.fused_step(): loss.backward()`` replaces ``loss.backward(); aux_opt.step()``.
        With the ``cpp`` backend on CPU, each masked linear layer's backward then updates its aux
        tensor and Adam moments in the same pass that computes the coarse gradient, instead of
        writing ``dL/dM`` and reading it back in :meth:`step`: no ``.grad`` buffer for the aux, one
        pass over it instead of two, no separate gradient check. The result is bit for bit that of
        ``backward()`` then ``step()`` (the weights' optimiser may step before or after).

        What is fused: contiguous aux tensors whose ``.grad`` is ``None`` on entry (float32 with
        ``memory="standard"``, bfloat16 with ``"bf16_sr"``, whose noise is the same), in groups with
        the softplus surrogate, ``penalty_mode="mean"`` (or no penalty) and no ``inv_abs_weight``,
        in masked linear layers of weight granularity with float32 or bfloat16 weights and inputs of
        the weight's dtype, whose gradient the backward keeps and gets from that layer alone. Every
        other aux tensor gets its gradient as usual and is stepped by :meth:`step` when the block
        exits: convolutions, unit granularity, other backends, ``torch.compile``, ``create_graph``,
        ``torch.autograd.grad`` and ``backward(inputs=...)`` without the aux, an aux shared by two
        layers or also used directly by the loss.

        Rules:

        * The group values (``lr``, ``betas``, ``eps``, ``penalty``, ``rho``, ``layer_scale``) are
          read when the block is entered; changes made inside it apply from the next step.
        * One backward through each fused layer per block: a second backward or gradient
          accumulation raises (the step would be taken twice; usually autograd's own error that a
          saved tensor was modified in place comes first).
        * What the node cannot see: the backward's root node. If the root itself feeds an aux
          tensor (the aux is an operand of the loss's last op, as in ``mse_loss(out, aux)``, or the
          output of a layer called twice is differentiated directly), or one aux is shared by layers
          in two reentrant checkpoint segments, the step is taken on the layer's gradient alone and
          the block raises when it sees the other gradient. Make the loss a function of the outputs
          (``loss = f(out) + g(aux)`` is fine) or use ``backward()`` and :meth:`step`.
        * Single process only: the update runs before any all-reduce could average the gradient,
          so an initialised process group of more than one rank raises on entry.
        * ``nonfinite="raise"`` only: the step cannot be skipped after it was taken. An entry whose
          gradient is NaN/inf is never stepped (its aux and moments stay as they were, also with
          ``AUTOPRUNE_CHECK_FINITE=0``); when the block exits, the aux tensors that were not fused
          are stepped and then a ``ValueError`` names the parameter and the count. (:meth:`step`
          instead checks first and writes nothing.)
        * A fused aux tensor's gradient never exists: its ``.grad`` stays ``None``, and its tensor
          hooks are called with ``None``.
        """
        if self.nonfinite != "raise":
            raise ValueError(f"fused_step: needs nonfinite='raise' (the step is taken inside backward and "
                             f"cannot be skipped afterwards), got nonfinite={self.nonfinite!r}")
        if several_processes():
            raise RuntimeError("fused_step: single process only (the step would run before the gradients are "
                               "all-reduced); use backward() and step() under DDP / FSDP")
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        arm = getattr(torch.ops.autoprune_cpp, "fused_aux_arm", None) if _build.loaded() else None
        take = getattr(torch.ops.autoprune_cpp, "fused_aux_take", None) if arm is not None else None
        armed: list[tuple[int, int, Tensor, Tensor, dict | None]] = []  # group, position, param, armed alias, fresh
        try:
            for gi, group in enumerate(self.param_groups):
                if arm is None or not _fusable(group):
                    continue
                beta1, beta2 = group["betas"]
                total = sum(p.numel() for p in group["params"])
                sr = group["memory"] == "bf16_sr"
                dtype = torch.bfloat16 if sr else torch.float32
                for pi, (p, layer_scale) in enumerate(zip(group["params"], group["layer_scale"])):
                    if p.grad is not None or not p.requires_grad or not _fusable_tensor(p, dtype):
                        continue
                    _, fresh, step, exp_avg, exp_avg_sq = self._state_of(p, gi, pi, "sr" if sr else "fused")
                    if not (_fusable_tensor(exp_avg, dtype) and _fusable_tensor(exp_avg_sq, dtype)):
                        continue
                    scale = float(group["penalty"]) / total * float(layer_scale)  # as _scales, _plan
                    # bf16_sr: the noise keys _run would use for this step (seed of step + 1)
                    keys = _sr_keys(_sr_seed(group["sr_seed"], step + 1, gi, pi)) if sr else []
                    alias = p.detach()  # kept: take() finds the entry even if p.data is replaced meanwhile
                    hp = (step + 1, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), scale,
                          float(group["rho"]))
                    # the parameter itself: the node recognises it by its gradient accumulator (keys only
                    # for bf16_sr, so that a library built before bf16_sr fusion still fuses the rest)
                    if sr:
                        arm(p, exp_avg, exp_avg_sq, *hp, keys)
                    else:
                        arm(p, exp_avg, exp_avg_sq, *hp)
                    armed.append((gi, pi, p, alias, fresh))
            yield
        finally:
            bad: list[tuple[int, int, Tensor, int]] = []
            stepped_params: list[tuple[int, int, Tensor]] = []
            failure: BaseException | None = None
            for gi, pi, p, alias, fresh in armed:
                try:
                    _, stepped, nonfinite = take(alias)
                except BaseException as exc:  # keep disarming the others
                    failure = failure or exc
                    continue
                if stepped:  # the backward took the step: record it as step() does
                    if fresh is not None:
                        self.state[p] = fresh
                    self.state[p]["step"] += 1
                    stepped_params.append((gi, pi, p))
                if nonfinite:
                    bad.append((gi, pi, p, nonfinite))
            if failure is not None:
                raise failure
        twice = [(gi, pi, p) for gi, pi, p in stepped_params if p.grad is not None]
        if twice:  # another gradient arrived after the step: step() would step the tensor again
            gi, pi, p = twice[0]
            raise RuntimeError(
                f"fused_step: {self._param_name(gi, pi, p)} was stepped in backward on its layer's gradient and then "
                "got a .grad from elsewhere (the backward's root node feeding it directly, a reentrant checkpoint "
                "segment, or a gradient set by hand); it is not stepped again, and that gradient is left in .grad. "
                "Use backward() and step() for such a loss."
            )
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            try:
                self.step()  # the aux tensors that were not fused
            except ValueError as exc:
                if stepped_params:
                    raise ValueError(f"{exc} -- among the aux tensors not fused; the "
                                     f"{len(stepped_params)} fused ones were stepped in backward") from None
                raise
        if bad and _checks._finite_checks_enabled():
            gi, pi, p, count = bad[0]
            raise ValueError(
                f"grad: expected finite gradients, found NaN or inf in {count} entries of the gradient of "
                f"{self._param_name(gi, pi, p)} during fused_step; those entries were left unchanged, the finite "
                "ones were stepped"
            )

    @staticmethod
    def _args(call: dict[str, Any]) -> tuple:
        es = call["entries"]
        return ([e["aux"] for e in es], [e["exp_avg"] for e in es], [e["exp_avg_sq"] for e in es],
                [e["grad"] for e in es], [e["weight"] for e in es], [e["step"] for e in es],
                [e["scale"] for e in es], *call["hp"])

    def _with_names(self, exc: Exception, call: dict[str, Any]) -> Exception:
        """``exc`` (from the op layer, naming list entries ``[i]``) with those entries' parameters."""
        es = call["entries"]
        idx = sorted({int(i) for i in re.findall(r"\[(\d+)\]", str(exc)) if int(i) < len(es)})
        if not idx:
            return exc
        where = ", ".join(f"[{i}] = {self._param_name(es[i]['gi'], es[i]['pi'], es[i]['p'])}" for i in idx)
        return type(exc)(f"{exc} (AuxAdam.step: {where})")

    def _validate(self, calls: list[dict[str, Any]]) -> None:
        """The op layer's checks of every call, and the memory checks over all calls at once."""
        written: list[tuple[str, Tensor]] = []
        read: list[tuple[str, Tensor]] = []
        for call in calls:
            try:
                _ops.check_aux_adam_step_multi_args(*self._args(call), memory=False)
            except (TypeError, ValueError) as exc:
                raise self._with_names(exc, call) from None
            for e in call["entries"]:
                name = (" of ", self._param_name(e["gi"], e["pi"], e["p"]))
                for kind in ("aux", "exp_avg", "exp_avg_sq"):
                    _checks.check_no_internal_overlap(e[kind], (kind, *name))
                    written.append(((kind, *name), e[kind]))
                read.append((("grad", *name), e["grad"]))
                if e["weight"] is not None:
                    read.append((("weight", *name), e["weight"]))
        _checks.check_no_overlap(written, read)

    def _run(self, call: dict[str, Any]) -> None:
        auxes, m1s, m2s, grads, mags, steps, pscales, lr, beta1, beta2, eps, rho, surrogate, alpha = self._args(call)
        if call["kind"] == "sr":
            for i, e in enumerate(call["entries"]):
                seed = _sr_seed(e["seed_base"], steps[i], e["gi"], e["pi"])
                _sr_adam_step_(auxes[i], m1s[i], m2s[i], grads[i], mags[i], steps[i], lr, beta1, beta2, eps,
                               pscales[i], rho, surrogate, alpha, seed=seed)
            return
        if not self._warned_low_precision and any(a.dtype in (torch.bfloat16, torch.float16) for a in auxes):
            self._warned_low_precision = True
            warnings.warn(
                "AuxAdam: a bfloat16/float16 aux is stepped with memory='standard': Adam updates under half "
                "an ulp of the aux are lost (the masks stall). Use memory='bf16_sr' (stochastic rounding) "
                "or a float32 aux.",
                stacklevel=3,
            )
        if call["kind"] == "fused":
            try:
                _ops.call_aux_adam_step_multi_(auxes, m1s, m2s, grads, mags, steps, pscales,
                                               lr, beta1, beta2, eps, rho, surrogate, alpha)
            except (TypeError, ValueError) as exc:  # raised by the op's checks, before it wrote anything
                raise self._with_names(exc, call) from None
        else:
            for i in range(len(auxes)):
                _ops.call_aux_adam_step_(
                    auxes[i], m1s[i], m2s[i], grads[i], mags[i], steps[i], lr, beta1, beta2, eps, pscales[i], rho,
                    surrogate, alpha,
                )

    def penalty_value(self) -> float:
        """Current value of the total density penalty ``sum_g P_g`` (for logging)."""
        return float(sum(ref.density_penalty(g["params"], g["penalty"], g["rho"]) for g in self.param_groups))

    def density(self) -> float:
        """Fraction of kept entries over all auxiliary tensors of this optimiser."""
        return float(ref.density([p for g in self.param_groups for p in g["params"]]))


def _fusable(group: dict[str, Any]) -> bool:
    """Whether :meth:`AuxAdam.fused_step` can take the step of ``group``'s parameters in backward."""
    return (group["surrogate"] == "softplus" and not group["inv_abs_weight"]
            and (group["penalty_mode"] == "mean" or float(group["penalty"]) == 0.0))


def _fusable_tensor(t: Tensor, dtype: torch.dtype) -> bool:
    return (type(t) in _checks.PLAIN_TENSOR_TYPES and t.device.type == "cpu"
            and t.dtype == dtype and t.is_contiguous() and t.numel() > 0)


def _nonfinite_scan() -> Any:
    """``autoprune_cpp::nonfinite_indices`` where the loaded extension has it, else ``None``."""
    return getattr(torch.ops.autoprune_cpp, "nonfinite_indices", None) if _build.loaded() else None


def _sr_seed(seed: int, step: int, group: int, index: int) -> int:
    """A 63-bit seed for one tensor's rounding noise at one step: reproducible on resume."""
    return (seed * 1_000_003 + step * 10_007 + group * 101 + index) % (2**63 - 1)


def stochastic_round_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically: up with probability equal to the fraction of
    the gap to the next bfloat16 value, so ``E[round(x)] = x``. NaN and inf pass through."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return _round_bf16_with(x, noise)


def _round_bf16_with(x: Tensor, noise: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 with the 16-bit ``noise`` (int32, ``x``'s shape) added to its low bits."""
    bits = x.float().contiguous().view(torch.int32)
    # sign-magnitude: adding to the low 16 bits of the magnitude then truncating rounds |x| up with
    # probability (low bits) / 2^16, for either sign
    rounded = ((bits + noise.reshape(bits.shape)) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x.float())
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


_M32 = 0xFFFFFFFF


def _lowbias32(x: Any) -> Any:
    """A 32-bit integer hash (a multiply-xorshift; the C++ kernels' ``lowbias32``) of an int or of an
    int64 tensor of values under 2^32 (each product stays under 2^63: no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _sr_keys(seed: int) -> list[int]:
    """The 32-bit noise keys of one tensor's step (``seed`` from :func:`_sr_seed`) for its three writes:
    exp_avg, exp_avg_sq, aux."""
    base = _lowbias32(_lowbias32(seed & _M32) ^ _lowbias32((seed >> 32) & _M32))
    return [_lowbias32(base ^ ((0x9E3779B9 * (s + 1)) & _M32)) for s in range(3)]


def _sr_noise(shape: torch.Size, key: int, device: torch.device) -> Tensor:
    """16 bits of noise per entry: ``lowbias32(k ^ key) >> 16`` for the entry's flat index ``k`` (mod
    2^32), computed in int64 without overflow (each product is under 2^63). A function of the key and
    the index only, so the fused C++ step (``autoprune_cpp::aux_adam_step_sr_``) draws the same noise."""
    x = _lowbias32((torch.arange(math.prod(shape), dtype=torch.int64, device=device) & _M32) ^ key)
    return (x >> 16).to(torch.int32).reshape(shape)


def _sr_adam_step_(aux: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor | None, weight: Tensor | None,
                   step: int, lr: float, beta1: float, beta2: float, eps: float, penalty_scale: float, rho: float,
                   surrogate: str, alpha: float, *, seed: int) -> None:
    """The reference Adam step of ``aux`` (:func:`autoprune_ext.reference.aux_adam_step_`) computed in
    float32, with aux and moments written back with stochastic rounding (keyed noise, :func:`_sr_noise`).

    On CPU with the C++ extension, one fused pass (``autoprune_cpp::aux_adam_step_sr_``) does the same
    with the same noise; its float32 arithmetic (the kernels' softplus, fused multiply-adds) may differ
    from these PyTorch ops in the last bit, so a result may land on the other bfloat16 neighbour where
    the noise falls between the two (tested: within one bfloat16 step, nearly all entries equal).
    """
    keys = _sr_keys(seed)
    fused = _sr_kernel() if aux.device.type == "cpu" else None
    if fused is not None and all(type(t) in _checks.PLAIN_TENSOR_TYPES for t in (aux, exp_avg, exp_avg_sq)):
        fused(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate,
              alpha, keys)
        return
    g = ref.penalty_grad(aux, penalty_scale, rho, surrogate, alpha, weight).float()
    if grad is not None:
        g = g + grad.float()
    m1 = exp_avg.float().mul(beta1).add_(g, alpha=1 - beta1)
    m2 = exp_avg_sq.float().mul(beta2).addcmul_(g, g, value=1 - beta2)
    new = aux.float() - (lr / (1 - beta1**step)) * m1 / (m2.sqrt() / math.sqrt(1 - beta2**step) + eps)
    exp_avg.copy_(_round_bf16_with(m1, _sr_noise(m1.shape, keys[0], m1.device)))
    exp_avg_sq.copy_(_round_bf16_with(m2, _sr_noise(m2.shape, keys[1], m2.device)).clamp_min(0))
    aux.copy_(_round_bf16_with(new, _sr_noise(new.shape, keys[2], new.device)))


def _sr_kernel() -> Any:
    """``autoprune_cpp::aux_adam_step_sr_`` where the loaded extension has it, else ``None``."""
    return getattr(torch.ops.autoprune_cpp, "aux_adam_step_sr_", None) if _build.loaded() else None


def _global_sum(values: list[Tensor], like: list[Tensor]) -> Tensor:
    """Sum of local partial sums ``values`` (each belonging to tensor ``like[i]``) over all shards."""
    if not values:
        return torch.zeros((), dtype=torch.float64)
    reduced = sum_over_shards(values, like)
    return torch.stack([v.reshape(()).to(reduced[0].device) for v in reduced]).sum()


def _penalty_key(name: str, module: nn.Module, penalty: Penalty) -> tuple[str, float]:
    if isinstance(penalty, (int, float)) and not isinstance(penalty, bool):
        return "all", float(penalty)
    if not isinstance(penalty, Mapping):
        raise TypeError(f"penalty: expected a float or a mapping of group -> float, got {type(penalty).__name__}")
    for key, lam in penalty.items():
        if key not in ("linear", "conv") and fnmatch.fnmatchcase(name, key):
            return key, float(lam)
    kind = "linear" if isinstance(module, nn.Linear) else "conv"
    if kind in penalty:
        return kind, float(penalty[kind])
    return "unpenalised", 0.0
