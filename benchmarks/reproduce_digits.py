"""Reproduction table of the README: AutoPrune vs global magnitude pruning on digits, 3 seeds.

For each model and seed this runs the ``autoprune-ext prune`` job with ``--baseline`` (global
magnitude pruning of the same parent at AutoPrune's final density, then trained on the same
schedule) and writes ``benchmarks/results/digits_reproduction.json`` plus a markdown table.

    python benchmarks/reproduce_digits.py [--seeds 0 1 2] [--models lenet300 lenet5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from autoprune_ext.autoprune import AutoPruneConfig
from autoprune_ext.cli import MODEL_DEFAULTS
from autoprune_ext.prune_job import PruneJob, run

def settings(model: str) -> dict:
    """The CLI's per-model defaults (what ``autoprune-ext prune --model M`` runs)."""
    d = MODEL_DEFAULTS[model]
    return {"penalty": {"linear": d["lambda_fc"], "conv": d["lambda_conv"]}, "lr_aux": d["lr_aux"],
            "inv_abs_weight": d["inv_abs_weight"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODEL_DEFAULTS))
    parser.add_argument("--out", default="benchmarks/results/digits_reproduction.json")
    parser.add_argument("--runs", default="runs/reproduce")
    args = parser.parse_args()

    rows, results = [], {}
    for model in args.models:
        s = settings(model)
        reports = []
        for seed in args.seeds:
            cfg = AutoPruneConfig(**s, lr_weight=1e-3, batch_size=64, seed=seed)
            job = PruneJob(model=model, data="digits", out=f"{args.runs}/{model}-s{seed}", seed=seed,
                           baseline=True, progress=False, autoprune=cfg)
            reports.append(run(job, log=lambda *a: None))
            r = reports[-1]
            print(f"{model} seed {seed}: dense {r['dense_accuracy']:.4f} autoprune {r['pruned_accuracy']:.4f} "
                  f"magnitude {r['magnitude_accuracy']:.4f} compression {r['compression']:.1f}x "
                  f"flops {r['flops_fraction']:.4f} {r['seconds']:.0f}s", flush=True)
        keys = ("dense_accuracy", "pruned_accuracy", "magnitude_accuracy", "compression", "flops_fraction", "seconds")
        summary = {k: mean_std([r[k] for r in reports]) for k in keys}
        drops = [r["dense_accuracy"] - r["pruned_accuracy"] for r in reports]
        summary["accuracy_drop"] = mean_std(drops)
        results[model] = {"settings": s, "summary": summary, "runs": [
            {k: r[k] for k in keys} | {"seed": seed} for r, seed in zip(reports, args.seeds)]}
        rows.append((model, summary))

    out = {
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": args.seeds,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    def pm(v: tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
        return f"{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}"

    print("\n| model | dense acc. (%) | AutoPrune acc. (%) | compression | FLOPs kept (%) | magnitude + FT acc. (%) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for model, s in rows:
        print(f"| {model} | {pm(s['dense_accuracy'])} | {pm(s['pruned_accuracy'])} | {pm(s['compression'], 1, 1)}x | "
              f"{pm(s['flops_fraction'])} | {pm(s['magnitude_accuracy'])} | {pm(s['seconds'], 1, 0)} |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
