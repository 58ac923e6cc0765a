"""``AuxAdam``: the optimiser of the auxiliary tensors, with the density penalty fused into the step."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from . import ops as _ops  # noqa: F401  (registers torch.ops.autoprune)
from . import reference as ref
from .convert import masked_modules
from .sparsity import local, sum_over_shards

Penalty = float | Mapping[str, float]

#: how a group's ``lambda`` becomes the per-entry penalty scale (see :class:`AuxAdam`)
PENALTY_MODES: tuple[str, ...] = ("mean", "relative")
#: storage of the aux and its Adam moments (see :class:`AuxAdam`)
MEMORY_MODES: tuple[str, ...] = ("standard", "bf16_sr")


class AuxAdam(torch.optim.Optimizer):
    """Adam over auxiliary tensors ``M`` whose gradient gets the density penalty added in the same pass.

    Each parameter group is one *penalty group* ``g`` (``shared/docs/method.md`` section 3): the
    step adds ``scale_g * (s(m) - rho * s(-m))`` to ``dL/dM`` (times ``1/|w|`` with
    ``inv_abs_weight``), then applies Adam with bias correction, in place, through the fused op
    ``torch.ops.autoprune.aux_adam_step_multi_`` (one call per group and device).

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
      small updates accumulate instead of vanishing: 8 bytes. The noise is a function of
      ``(sr_seed, step, parameter index)``, so a resumed run repeats it exactly. The aux must be
      bfloat16 (``convert(..., aux_dtype=torch.bfloat16)``); runs in PyTorch, not the fused kernels.

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
        foreach: one fused multi-tensor call per group (``True``) or one call per tensor.
        weights: mapping from each aux parameter to its layer weight (for ``inv_abs_weight``).

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
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr: expected a non-negative float, got {lr}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas: expected two floats in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps: expected a non-negative float, got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, penalty=penalty, penalty_mode=penalty_mode, rho=rho,
                        inv_abs_weight=inv_abs_weight, surrogate=surrogate, alpha=alpha, foreach=foreach,
                        memory=memory, sr_seed=sr_seed)
        self._warned_low_precision = False
        super().__init__(params, defaults)
        # aux -> weight, outside the param groups so that state_dict never stores weight tensors
        self.weights: dict[Tensor, Tensor] = dict(weights or {})
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        _checks.check_names(group["surrogate"], "sign", group["alpha"])
        if not (isinstance(group["penalty"], (int, float)) and group["penalty"] >= 0):
            raise ValueError(f"penalty: expected a non-negative float, got {group['penalty']!r}")
        if not (isinstance(group["rho"], (int, float)) and group["rho"] >= 0):
            raise ValueError(f"rho: expected a non-negative float, got {group['rho']!r}")
        if group["memory"] not in MEMORY_MODES:
            raise ValueError(f"memory: expected one of {MEMORY_MODES}, got {group['memory']!r}")
        if group["memory"] == "bf16_sr":
            wrong = [tuple(p.shape) for p in group["params"] if p.dtype != torch.bfloat16]
            if wrong:
                raise TypeError(f"memory: 'bf16_sr' needs bfloat16 aux tensors "
                                f"(convert(..., aux_dtype=torch.bfloat16)); got other dtypes for shapes {wrong}")
        if not isinstance(group["sr_seed"], int):
            raise TypeError(f"sr_seed: expected an int, got {type(group['sr_seed']).__name__}")
        if group["penalty_mode"] not in PENALTY_MODES:
            raise ValueError(f"penalty_mode: expected one of {PENALTY_MODES}, got {group['penalty_mode']!r}")
        scales = group.setdefault("layer_scale", [1.0] * len(group["params"]))
        if len(scales) != len(group["params"]) or not all(isinstance(v, (int, float)) and v >= 0 for v in scales):
            raise ValueError(
                f"layer_scale: expected {len(group['params'])} non-negative floats (one per parameter), got {scales!r}"
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
        per_layer = set(per_layer)
        groups: dict[tuple[str, str, float], dict[str, Any]] = {}
        weights: dict[Tensor, Tensor] = {}
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
        if not groups:
            raise ValueError("model: has no masked layers; call autoprune_ext.convert(model) first")
        return cls(list(groups.values()), lr, betas, eps, penalty_mode=penalty_mode, rho=rho,
                   inv_abs_weight=inv_abs_weight, foreach=foreach, weights=weights, memory=memory, sr_seed=sr_seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "weights"):
            self._check_group(self.param_groups[-1])

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

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One fused penalty + Adam step of every auxiliary tensor that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = self._scales()
        for group, group_scale in zip(self.param_groups, scales):
            beta1, beta2 = group["betas"]
            by_device: dict[torch.device, list[tuple[Tensor, float]]] = {}
            for p, layer_scale in zip(group["params"], group["layer_scale"]):
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append((p, group_scale * float(layer_scale)))
            for params in by_device.values():
                auxes, m1s, m2s, grads, mags, steps, pscales = [], [], [], [], [], [], []
                for p, scale in params:
                    state = self.state[p]
                    if not state:
                        moment_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                        if group["memory"] == "bf16_sr":
                            moment_dtype = torch.bfloat16
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
                    state["step"] += 1
                    # DTensor (FSDP2): the step is elementwise, so it runs on the local shards in place
                    auxes.append(local(p))
                    m1s.append(local(state["exp_avg"]))
                    m2s.append(local(state["exp_avg_sq"]))
                    grads.append(local(p.grad))
                    mags.append(self._magnitude(p) if group["inv_abs_weight"] else None)
                    steps.append(int(state["step"]))
                    pscales.append(scale)
                args = (group["lr"], beta1, beta2, group["eps"])
                tail = (group["rho"], group["surrogate"], float(group["alpha"]))
                if group["memory"] == "bf16_sr":
                    index = {id(q): i for i, q in enumerate(group["params"])}
                    for i, (p, _) in enumerate(params):
                        seed = _sr_seed(group["sr_seed"], steps[i], self.param_groups.index(group), index[id(p)])
                        _sr_adam_step_(auxes[i], m1s[i], m2s[i], grads[i], mags[i], steps[i], *args, pscales[i],
                                       *tail, seed=seed)
                    continue
                if not self._warned_low_precision and any(a.dtype in (torch.bfloat16, torch.float16) for a in auxes):
                    self._warned_low_precision = True
                    warnings.warn(
                        "AuxAdam: a bfloat16/float16 aux is stepped with memory='standard': Adam updates under half "
                        "an ulp of the aux are lost (the masks stall). Use memory='bf16_sr' (stochastic rounding) "
                        "or a float32 aux.",
                        stacklevel=2,
                    )
                if group["foreach"]:
                    torch.ops.autoprune.aux_adam_step_multi_(auxes, m1s, m2s, grads, mags, steps, pscales, *args, *tail)
                else:
                    for i in range(len(auxes)):
                        torch.ops.autoprune.aux_adam_step_(
                            auxes[i], m1s[i], m2s[i], grads[i], mags[i], steps[i], *args, pscales[i], *tail
                        )
        return loss

    def penalty_value(self) -> float:
        """Current value of the total density penalty ``sum_g P_g`` (for logging)."""
        return float(sum(ref.density_penalty(g["params"], g["penalty"], g["rho"]) for g in self.param_groups))

    def density(self) -> float:
        """Fraction of kept entries over all auxiliary tensors of this optimiser."""
        return float(ref.density([p for g in self.param_groups for p in g["params"]]))


def _sr_seed(seed: int, step: int, group: int, index: int) -> int:
    """A 63-bit seed for one tensor's rounding noise at one step: reproducible on resume."""
    return (seed * 1_000_003 + step * 10_007 + group * 101 + index) % (2**63 - 1)


def stochastic_round_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically: up with probability equal to the fraction of
    the gap to the next bfloat16 value, so ``E[round(x)] = x``. NaN and inf pass through."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    # sign-magnitude: adding to the low 16 bits of the magnitude then truncating rounds |x| up with
    # probability (low bits) / 2^16, for either sign
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x.float())
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def _sr_adam_step_(aux: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor | None, weight: Tensor | None,
                   step: int, lr: float, beta1: float, beta2: float, eps: float, penalty_scale: float, rho: float,
                   surrogate: str, alpha: float, *, seed: int) -> None:
    """The reference Adam step of ``aux`` (:func:`autoprune_ext.reference.aux_adam_step_`) computed in
    float32, with aux and moments written back with stochastic rounding."""
    g = ref.penalty_grad(aux, penalty_scale, rho, surrogate, alpha, weight).float()
    if grad is not None:
        g = g + grad.float()
    m1 = exp_avg.float().mul(beta1).add_(g, alpha=1 - beta1)
    m2 = exp_avg_sq.float().mul(beta2).addcmul_(g, g, value=1 - beta2)
    new = aux.float() - (lr / (1 - beta1**step)) * m1 / (m2.sqrt() / math.sqrt(1 - beta2**step) + eps)
    gen = torch.Generator(device=aux.device).manual_seed(seed)
    exp_avg.copy_(stochastic_round_bf16(m1, gen))
    exp_avg_sq.copy_(stochastic_round_bf16(m2, gen).clamp_min(0))
    aux.copy_(stochastic_round_bf16(new, gen))


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
