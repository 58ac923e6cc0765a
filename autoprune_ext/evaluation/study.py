"""The prune-potential study: methods x prune ratios x test distributions, over several parents.

For every parent seed: train a dense parent and an independently trained "separate" network of the
same architecture; build the test distributions (the nominal test set and each corruption at each
severity, computed on de-normalised [0, 1] images and re-normalised); run the prune-retrain loop of
every method; evaluate each retrained network on every distribution and under uniform input noise.
Then aggregate: accuracy curves, prune potential (delta 0.5% and 0), excess error with a
zero-intercept fit, noise-similarity curves, and write ``DIR/potential.json`` (+ PNGs, see
:mod:`autoprune_ext.evaluation.plots`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .loop import MODES, RetrainConfig, geometric_ratios, prune_retrain, train_parent
from .metrics import (
    excess_error,
    fit_zero_intercept,
    mean_curves,
    mean_std,
    noise_levels,
    noise_prune_potential,
    prune_potential_from_accuracy,
    NoiseProbe,
)

#: the paper's four baselines and AutoPrune (the default method list)
DEFAULT_METHODS = ("autoprune", "wt", "sipp", "ft", "pfp")
#: methods defined in this package whatever the registry holds
BUILTIN_METHODS = ("autoprune", "magnitude")
NOMINAL = "nominal"
#: seed offset of the separately trained comparison network
SEPARATE_OFFSET = 1000


def default_prune_ratios(n: int = 10, first_keep: float = 0.8, last_keep: float = 0.02) -> list[float]:
    """Prune ratios ``1 - k`` for geometric keep ratios ``k`` from ``first_keep`` down to ``last_keep``."""
    return [1.0 - k for k in geometric_ratios(first_keep, last_keep, n)]


def ratio_key(prune_ratio: float) -> str:
    """The JSON key of a prune ratio (4 decimals)."""
    return f"{prune_ratio:.4f}"


def distribution_name(corruption: str, severity: int) -> str:
    return f"{corruption}-s{int(severity)}"


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
def _registry() -> Any:
    from ..pruners import autoprune_pruner

    try:
        from ..pruners import registry
    except ImportError:
        return None
    autoprune_pruner.register()
    return registry


def method_available(name: str) -> tuple[bool, str]:
    """Whether pruning method ``name`` can be built here, and why not."""
    if name in BUILTIN_METHODS:
        return True, ""
    registry = _registry()
    if registry is None:
        return False, f"unknown method {name!r} (autoprune_ext/pruners/registry.py is not there; built in: " \
                      f"{', '.join(BUILTIN_METHODS)})"
    try:
        registry.get_pruner(name)
    except Exception as exc:  # noqa: BLE001 - the registry's own error text is the message
        return False, f"unknown method {name!r} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return True, ""


def available_methods() -> list[str]:
    """The methods that can be built here, from the default list and the built-ins."""
    return [m for m in dict.fromkeys(DEFAULT_METHODS + BUILTIN_METHODS) if method_available(m)[0]]


def make_pruner(name: str, *, train: TensorDataset | None = None, autoprune_steps: int = 300,
                autoprune_overrides: dict[str, Any] | None = None, progress: bool = False) -> Any:
    """A fresh pruner instance for method ``name`` (``autoprune`` gets the training set and steps)."""
    from ..pruners.autoprune_pruner import AutoPrunePruner, GlobalMagnitudePruner

    if name == "autoprune":
        return AutoPrunePruner(train=train, steps=autoprune_steps, progress=progress, **(autoprune_overrides or {}))
    if name == "magnitude":
        return GlobalMagnitudePruner()
    ok, why = method_available(name)
    if not ok:
        raise ValueError(why)
    obj = _registry().get_pruner(name)
    return obj() if isinstance(obj, type) else obj


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def shifted_test_sets(test: TensorDataset, mean: Sequence[float], std: Sequence[float], corruptions: Sequence[str],
                      severities: Sequence[int], seed: int = 0) -> dict[str, TensorDataset]:
    """``{"<corruption>-s<severity>": dataset}``: the test images de-normalised to [0, 1], corrupted,
    and normalised again with the same statistics."""
    from ..corruptions import corrupt_dataset

    x, y = test.tensors[:2]
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    raw = (x * s + m).clamp(0.0, 1.0)
    out = {}
    for c in corruptions:
        for sev in severities:
            xc, _ = corrupt_dataset(raw, y, c, int(sev), seed=seed)
            out[distribution_name(c, sev)] = TensorDataset(((xc - m) / s).to(x.dtype), y)
    return out


def corruption_group(corruption: str) -> str:
    from ..corruptions import BLUR_CORRUPTIONS, NOISE_CORRUPTIONS

    return "noise" if corruption in NOISE_CORRUPTIONS else "blur" if corruption in BLUR_CORRUPTIONS else "other"


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
@dataclass
class StudyConfig:
    """Options of a study (the flags of ``autoprune-ext potential``)."""

    model: str = "lenet300"
    data: str = "digits"
    data_dir: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    prune_ratios: tuple[float, ...] = field(default_factory=lambda: tuple(default_prune_ratios()))
    seeds: tuple[int, ...] = (0,)
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (3,)
    mode: str = "cascade"
    dense_steps: int = 1000
    retrain_steps: int | None = None  # None: the parent's schedule (learning-rate rewinding)
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    autoprune_steps: int = 300
    autoprune_overrides: dict[str, Any] = field(default_factory=dict)
    noise_eps: tuple[float, ...] = field(default_factory=lambda: tuple(noise_levels()))
    noise_draws: int = 10  # the paper: 100
    noise_images: int = 256  # test images used by the noise probe (0: all)
    data_seed: int = 0
    device: str = "cpu"
    deltas: tuple[float, float] = (0.005, 0.0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        ratios = [float(r) for r in self.prune_ratios]
        if not ratios or any(not (0.0 <= r < 1.0) for r in ratios):
            raise ValueError(f"prune_ratios: expected fractions in [0, 1), got {ratios}")
        self.prune_ratios = tuple(sorted(set(ratios)))
        if not self.methods:
            raise ValueError("methods: expected at least one method")
        if not self.seeds:
            raise ValueError("seeds: expected at least one parent seed")
        if any(not 1 <= int(s) <= 5 for s in self.severities) or not self.severities:
            raise ValueError(f"severities: expected integers in 1..5, got {list(self.severities)}")
        if self.dense_steps < 1:
            raise ValueError(f"dense_steps: expected a positive integer, got {self.dense_steps}")

    @property
    def keep_ratios(self) -> list[float]:
        return [1.0 - r for r in self.prune_ratios]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_splits(cfg: StudyConfig) -> Any:
    from ..data import load_dataset

    if cfg.data == "digits":
        return load_dataset("digits", seed=cfg.data_seed)
    return load_dataset(cfg.data, cfg.data_dir, seed=cfg.data_seed)


def _build(cfg: StudyConfig, splits: Any, seed: int) -> nn.Module:
    from ..models import get_model

    torch.manual_seed(seed)
    return get_model(cfg.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                     image_size=splits.image_size).to(cfg.device)


def _accuracies(model: nn.Module, dists: dict[str, TensorDataset]) -> dict[str, float]:
    from ..training import accuracy

    return {name: accuracy(model, ds) for name, ds in dists.items()}


def run_study(cfg: StudyConfig, out: str | Path | None = None, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study; returns the result dict (also ``out/potential.json`` and PNGs when ``out``)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for m in cfg.methods:
        ok, why = method_available(m)
        if not ok:
            raise ValueError(f"--methods: {why}")
    splits = load_splits(cfg)
    dists: dict[str, TensorDataset] = {NOMINAL: splits.test}
    groups = {NOMINAL: "nominal"}
    t0 = time.perf_counter()
    shifted = shifted_test_sets(splits.test, splits.mean, splits.std, cfg.corruptions, cfg.severities, seed=cfg.data_seed)
    dists.update(shifted)
    for c in cfg.corruptions:
        for sev in cfg.severities:
            groups[distribution_name(c, sev)] = corruption_group(c)
    log(f"data: {splits}; {len(shifted)} shifted test sets built in {time.perf_counter() - t0:.1f} s")
    retrain_steps = cfg.dense_steps if cfg.retrain_steps is None else cfg.retrain_steps
    keep = cfg.keep_ratios  # decreasing keep ratios (prune ratios are sorted increasing)
    ratios = [1.0 - k for k in keep]
    use_noise = cfg.noise_draws > 0 and len(cfg.noise_eps) > 0
    n_noise = len(splits.test) if cfg.noise_images <= 0 else min(cfg.noise_images, len(splits.test))

    parents: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    total = len(cfg.seeds) * len(cfg.methods)
    bar = tqdm(total=total, desc="study", disable=None if progress else True)
    for seed in cfg.seeds:
        sched = RetrainConfig(steps=cfg.dense_steps, lr=cfg.lr, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                              seed=int(seed))
        bar.set_postfix(seed=seed, step="parent")
        parent = train_parent(_build(cfg, splits, int(seed)), splits.train, sched, progress=progress, desc="parent")
        separate_sched = RetrainConfig(**{**sched.to_dict(), "seed": int(seed) + SEPARATE_OFFSET})
        separate = train_parent(_build(cfg, splits, int(seed) + SEPARATE_OFFSET), splits.train, separate_sched,
                                progress=progress, desc="separate")
        info: dict[str, Any] = {"accuracy": _accuracies(parent, dists),
                                "separate_accuracy": _accuracies(separate, dists)}
        probe = None
        if use_noise:
            probe = NoiseProbe(parent, splits.test.tensors[0][:n_noise], splits.test.tensors[1][:n_noise],
                               eps=cfg.noise_eps, draws=cfg.noise_draws, seed=int(seed))
            info["noise_accuracy"] = probe.parent_accuracy
            info["separate_noise"] = probe.evaluate(separate)
        parents[str(seed)] = info
        log(f"parent seed {seed}: nominal accuracy {100 * info['accuracy'][NOMINAL]:.2f}% "
            f"(separate network {100 * info['separate_accuracy'][NOMINAL]:.2f}%)")

        def evaluate(model: nn.Module, probe: NoiseProbe | None = probe) -> dict[str, Any]:
            rec: dict[str, Any] = {"accuracy": _accuracies(model, dists)}
            if probe is not None:
                rec["noise"] = probe.evaluate(model)
            return rec

        runs[str(seed)] = {}
        for method in cfg.methods:
            bar.set_postfix(seed=seed, method=method)
            pruner = make_pruner(method, train=splits.train, autoprune_steps=cfg.autoprune_steps,
                                 autoprune_overrides=cfg.autoprune_overrides)
            t0 = time.perf_counter()
            records = prune_retrain(
                parent, pruner, keep, train=splits.train, data=splits.heldout,
                retrain_config=RetrainConfig(**{**sched.to_dict(), "steps": retrain_steps}),
                mode=cfg.mode, evaluate=evaluate, skip_errors=True, progress=progress, desc=f"{method} s{seed}",
            )
            runs[str(seed)][method] = records
            log(f"  {method:<10} seed {seed}: {time.perf_counter() - t0:6.1f} s, nominal accuracy at prune ratio: "
                + " ".join(f"{100 * r:.1f}%:" + (f"{100 * rec['accuracy'][NOMINAL]:.1f}" if "error" not in rec else "n/a")
                           for r, rec in zip(ratios, records)))
            for r, rec in zip(ratios, records):
                if "error" in rec:
                    log(f"    {method} cannot prune {100 * r:.1f}%: {rec['error']}")
            bar.update(1)
    bar.close()
    result = summarize(cfg, ratios, list(dists), groups, parents, runs,
                       noise_info={"eps": list(cfg.noise_eps), "draws": cfg.noise_draws, "images": n_noise}
                       if use_noise else None)
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        write_result(result, out)
    return result


def summarize(cfg: StudyConfig, ratios: list[float], dist_names: list[str], groups: dict[str, str],
              parents: dict[str, dict[str, Any]], runs: dict[str, dict[str, list[dict[str, Any]]]],
              noise_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate the per-parent records into the result dict (means over parents, spreads, fits).

    A ratio a method could not reach (a record with ``error``) has no accuracy: it is left out of the
    means (``None`` when no parent reached it) and counts as failing in the prune potential."""
    seeds = list(runs)
    methods = list(cfg.methods)
    keys = [ratio_key(r) for r in ratios]
    shifted = [d for d in dist_names if d != NOMINAL]
    delta, delta0 = cfg.deltas

    def ok(rec: dict[str, Any]) -> bool:
        return "error" not in rec

    def stat(values: list[float | None]) -> tuple[float | None, float | None]:
        vals = [v for v in values if v is not None]
        return mean_std(vals) if vals else (None, None)

    def potential_of(seed: str, method: str, dist: str, dl: float) -> float:
        recs = runs[seed][method]
        rs = [r for r, rec in zip(ratios, recs) if ok(rec)]
        accs = [rec["accuracy"][dist] for rec in recs if ok(rec)]
        return prune_potential_from_accuracy(rs, accs, parents[seed]["accuracy"][dist], dl)

    accuracy: dict[str, Any] = {}
    accuracy_std: dict[str, Any] = {}
    potential: dict[str, Any] = {}
    potential_std: dict[str, Any] = {}
    potential0: dict[str, Any] = {}
    achieved: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for m in methods:
        accuracy[m], accuracy_std[m], potential[m], potential_std[m], potential0[m] = {}, {}, {}, {}, {}
        achieved[m] = {k: stat([runs[s][m][i]["prune_ratio"] if ok(runs[s][m][i]) else None for s in seeds])[0]
                       for i, k in enumerate(keys)}
        errs = {f"{k} (seed {s})": runs[s][m][i]["error"] for s in seeds for i, k in enumerate(keys)
                if not ok(runs[s][m][i])}
        if errs:
            errors[m] = errs
        for d in dist_names:
            stats = [stat([runs[s][m][i]["accuracy"][d] if ok(runs[s][m][i]) else None for s in seeds])
                     for i in range(len(ratios))]
            accuracy[m][d] = {k: st[0] for k, st in zip(keys, stats)}
            accuracy_std[m][d] = {k: st[1] for k, st in zip(keys, stats)}
            potential[m][d], potential_std[m][d] = mean_std([potential_of(s, m, d, delta) for s in seeds])
            potential0[m][d] = mean_std([potential_of(s, m, d, delta0) for s in seeds])[0]

    def summary(pot: dict[str, float]) -> dict[str, float]:
        row = {"nominal": pot[NOMINAL]}
        if shifted:
            vals = [pot[d] for d in shifted]
            row["shifted_mean"], row["shifted_min"] = sum(vals) / len(vals), min(vals)
            for g in ("noise", "blur", "other"):
                gv = [pot[d] for d in shifted if groups.get(d) == g]
                if gv:
                    row[f"{g}_mean"] = sum(gv) / len(gv)
        return row

    # excess error, per (seed, method, ratio); err(., D') averaged over all shifted test sets
    excess: dict[str, Any] = {"definition": "[err(f', D') - err(f', D)] - [err(f, D') - err(f, D)], err(., D') the "
                                            "mean over all shifted test sets; fit: zero-intercept least squares",
                              "methods": {}}
    if shifted:
        xs_all, ys_all = [], []
        for m in methods:
            per_ratio: list[list[float]] = [[] for _ in ratios]
            xs, ys = [], []
            for s in seeds:
                pa = parents[s]["accuracy"]
                pf_nom, pf_shift = 1 - pa[NOMINAL], [1 - pa[d] for d in shifted]
                for i, rec in enumerate(runs[s][m]):
                    if not ok(rec):
                        continue
                    a = rec["accuracy"]
                    v = excess_error(1 - a[NOMINAL], [1 - a[d] for d in shifted], pf_nom, pf_shift)
                    per_ratio[i].append(v)
                    xs.append(rec["prune_ratio"])
                    ys.append(v)
            fit = fit_zero_intercept(xs, ys) if any(xs) else {"slope": float("nan"), "r2": float("nan")}
            stats = [stat(v) for v in per_ratio]
            excess["methods"][m] = {"ratios": ratios, "mean": [st[0] for st in stats], "std": [st[1] for st in stats],
                                    "slope": fit["slope"], "r2": fit["r2"],
                                    "points": [[x, y] for x, y in zip(xs, ys)]}
            xs_all += xs
            ys_all += ys
        excess["all"] = fit_zero_intercept(xs_all, ys_all) if any(xs_all) else {"slope": float("nan"), "r2": float("nan")}

    noise: dict[str, Any] = {}
    if noise_info is not None:
        eps = noise_info["eps"]
        noise = dict(noise_info)
        noise["parent_accuracy"] = mean_curves([{"a": parents[s]["noise_accuracy"]} for s in seeds])["a"]
        noise["separate"] = mean_curves([parents[s]["separate_noise"] for s in seeds])
        noise["methods"], noise["prune_potential"], noise["prune_potential_delta0"] = {}, {}, {}
        noise["closer_than_separate"] = {}
        sep = noise["separate"]["softmax_l2"]
        for m in methods:
            noise["methods"][m] = {}
            noise["closer_than_separate"][m] = {}
            for i, k in enumerate(keys):
                curves = [runs[s][m][i]["noise"] for s in seeds if ok(runs[s][m][i])]
                if curves:
                    noise["methods"][m][k] = mean_curves(curves)
                    noise["closer_than_separate"][m][k] = sum(
                        c < sv for c, sv in zip(noise["methods"][m][k]["softmax_l2"], sep)) / len(sep)
            for tag, dl in (("prune_potential", delta), ("prune_potential_delta0", delta0)):
                per = []
                for s in seeds:
                    recs = [(r, rec) for r, rec in zip(ratios, runs[s][m]) if ok(rec)]
                    per.append(noise_prune_potential([r for r, _ in recs], [rec["noise"]["accuracy"] for _, rec in recs],
                                                     parents[s]["noise_accuracy"], dl))
                noise[tag][m] = [sum(p[i] for p in per) / len(per) for i in range(len(eps))]

    return {
        "config": cfg.to_dict(),
        "methods": methods,
        "seeds": [int(s) for s in seeds],
        "distributions": dist_names,
        "groups": groups,
        "prune_ratios": ratios,
        "keep_ratios": [1.0 - r for r in ratios],
        "deltas": list(cfg.deltas),
        "parent_accuracy": {d: mean_std([parents[s]["accuracy"][d] for s in seeds])[0] for d in dist_names},
        "separate_accuracy": {d: mean_std([parents[s]["separate_accuracy"][d] for s in seeds])[0] for d in dist_names},
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "achieved_prune_ratio": achieved,
        "errors": errors,
        "prune_potential": potential,
        "prune_potential_std": potential_std,
        "prune_potential_delta0": potential0,
        "prune_potential_summary": {m: summary(potential[m]) for m in methods},
        "prune_potential_summary_delta0": {m: summary(potential0[m]) for m in methods},
        "excess_error": excess,
        "noise": noise,
        "parents": parents,
        "runs": runs,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_result(result: dict[str, Any], out: str | Path, plots: bool = True) -> list[Path]:
    """Write ``out/potential.json`` and (with ``plots``) the PNGs; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "potential.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=1))
    tmp.replace(path)
    written = [path]
    if plots:
        from .plots import plot_all

        written += plot_all(result, out)
    return written


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def potential_table(result: dict[str, Any], *, markdown: bool = False, delta0: bool = False) -> str:
    """The prune-potential table: one row per distribution (nominal, each shifted one, then the mean
    and min over the shifted ones), one column per method, values in percent (mean over parents)."""
    methods = result["methods"]
    pot = result["prune_potential_delta0" if delta0 else "prune_potential"]
    summ = result["prune_potential_summary_delta0" if delta0 else "prune_potential_summary"]
    parent = result["parent_accuracy"]
    rows = [["distribution", "parent acc"] + methods]
    for d in result["distributions"]:
        rows.append([d, f"{100 * parent[d]:.1f}"] + [f"{100 * pot[m][d]:.1f}" for m in methods])
    extra = [("mean shifted", "shifted_mean"), ("min shifted", "shifted_min"), ("mean noise-type", "noise_mean"),
             ("mean blur-type", "blur_mean")]
    for label, key in extra:
        if all(key in summ[m] for m in methods):
            rows.append([label, ""] + [f"{100 * summ[m][key]:.1f}" for m in methods])
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    n_dist = len(result["distributions"])
    if len(rows) > n_dist + 1:
        lines.insert(n_dist + 2, "-" * len(lines[0]))
    return "\n".join(lines)
