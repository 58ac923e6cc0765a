"""The main job behind ``autoprune-ext prune``: dense parent -> AutoPrune -> fine-tune -> report.

Writes into the output directory: ``report.json``, ``model.pt`` (the finalized model's state_dict,
loadable into the plain architecture with ``strict=True``), ``parent.pt`` (the dense parent),
``autoprune.ckpt`` (the AutoPrune checkpoint, see :mod:`autoprune_ext.checkpoint`) and ``curves.png``
(density and accuracy over steps).

Resume (``resume=True``, ``autoprune-ext prune --resume``): the parent comes from ``parent.pt`` and
AutoPrune continues from ``autoprune.ckpt``; the checkpoint is written right after the trainer is
built and every ``checkpoint_every`` steps, and fine-tuning is deterministic from its end state, so a
run killed at any point and resumed with the same flags ends with bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .autoprune import AutoPrune, AutoPruneConfig, freeze_masks, save_atomic
from .convert import finalize, sparsity_report
from .data import Splits, load_dataset
from .models import get_model
from .pruners.magnitude import global_magnitude_prune
from .sparsity import several_processes
from .training import accuracy, train_supervised


@dataclass
class PruneJob:
    """Options of one prune run (the CLI flags; see ``autoprune-ext prune --help``)."""

    model: str = "lenet300"
    data: str = "digits"
    data_dir: str | None = None
    out: str = "runs/prune"
    parent: str | None = None
    seed: int = 0
    device: str = "cpu"
    dense_steps: int = 2000
    dense_lr: float = 1e-3
    prune_steps: int = 1000
    finetune_steps: int = 300
    finetune_lr: float = 5e-4
    eval_every: int = 100
    baseline: bool = False
    progress: bool = True
    autoprune: AutoPruneConfig = field(default_factory=AutoPruneConfig)
    checkpoint_every: int = 100
    resume: bool = False
    #: config fields a resume may change (``True``: any); see :func:`autoprune_ext.checkpoint.load_checkpoint`
    allow_config_change: bool | tuple[str, ...] = ()

    def run_config(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint (besides the AutoPrune config)."""
        return {"model": self.model, "data": self.data, "seed": self.seed, "parent": self.parent,
                "dense_steps": 0 if self.parent else self.dense_steps, "dense_lr": self.dense_lr}


def load_splits(job: PruneJob) -> Splits:
    if job.data == "digits":
        return load_dataset("digits", seed=job.seed)
    return load_dataset(job.data, job.data_dir, seed=job.seed)


def build_parent(job: PruneJob, splits: Splits, log: Any = print) -> nn.Module:
    """The dense parent: loaded from ``job.parent``, or trained for ``job.dense_steps`` steps."""
    torch.manual_seed(job.seed)
    model = get_model(job.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                      image_size=splits.image_size).to(job.device)
    if job.parent:
        state = torch.load(job.parent, map_location=job.device, weights_only=True)
        try:
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except RuntimeError as exc:
            raise ValueError(f"parent: {job.parent} does not fit model {job.model!r}: "
                             f"{str(exc).strip().splitlines()[-1].strip()[:300]}") from None
        log(f"loaded dense parent from {job.parent}")
    else:
        train_supervised(model, splits.train, job.dense_steps, lr=job.dense_lr,
                         batch_size=job.autoprune.batch_size, seed=job.seed, progress=job.progress, desc="dense")
    return model


def magnitude_baseline(job: PruneJob, splits: Splits, parent_path: Path, density: float) -> float:
    """Test accuracy of global magnitude pruning of the same parent at ``density``, then trained with
    the mask enforced on the same schedule as AutoPrune's weights (its steps, then fine-tuning)."""
    torch.manual_seed(job.seed)
    model = get_model(job.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                      image_size=splits.image_size).to(job.device)
    model.load_state_dict(torch.load(parent_path, map_location=job.device, weights_only=True))
    global_magnitude_prune(model, density)
    bs = job.autoprune.batch_size
    train_supervised(model, splits.train, job.prune_steps, lr=job.autoprune.lr_weight, batch_size=bs,
                     seed=job.seed, progress=job.progress, desc="magnitude")
    if job.finetune_steps:
        train_supervised(model, splits.train, job.finetune_steps, lr=job.finetune_lr, batch_size=bs,
                         seed=job.seed + 7, progress=job.progress, desc="magnitude-ft")
    return accuracy(model, splits.test)


def plot_curves(history: list[dict[str, Any]], dense_accuracy: float, path: Path) -> None:
    """Density and test accuracy over AutoPrune steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6.4, 3.6))
    ax1.plot(steps, [r["density"] for r in history], color="tab:blue", label="density")
    ax1.set_yscale("log")
    ax1.set_xlabel("AutoPrune step")
    ax1.set_ylabel("density (kept / total)", color="tab:blue")
    ax2 = ax1.twinx()
    evals = [(r["step"], r["accuracy"]) for r in history if "accuracy" in r]
    if evals:
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="test accuracy")
    ax2.axhline(dense_accuracy, color="tab:orange", linestyle=":", label="dense parent")
    ax2.set_ylabel("test accuracy", color="tab:orange")
    fig.legend(loc="lower left", bbox_to_anchor=(0.12, 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(job: PruneJob, log: Any = print) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to ``<out>/report.json``)."""
    start = time.perf_counter()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "autoprune.ckpt"
    resuming = job.resume and ckpt.exists()
    if job.resume and not resuming:
        log(f"no checkpoint at {ckpt}: starting from the beginning")
    elif not job.resume and ckpt.exists():
        ckpt.unlink()  # a fresh run: never continue (or mix with) an earlier one unasked
    splits = load_splits(job)
    log(f"data: {splits}")
    if resuming and (out / "parent.pt").exists():
        job_parent = dataclasses.replace(job, parent=str(out / "parent.pt"))
        parent = build_parent(job_parent, splits, log)
    else:
        parent = build_parent(job, splits, log)
        save_atomic(parent.state_dict(), out / "parent.pt")
    dense_acc = accuracy(parent, splits.test)
    log(f"dense parent: test accuracy {100 * dense_acc:.2f}%")

    # the job's loss is a function of the outputs: in one process the mask steps can take their Adam
    # step inside backward (the same training bit for bit, where the kernels allow it)
    trainer = AutoPrune(parent, job.autoprune,
                        fused_aux_step=not several_processes() and job.autoprune.aux_nonfinite == "raise")
    if resuming:
        trainer.load(ckpt, run_config=job.run_config(), allow_config_change=job.allow_config_change)
        log(f"resuming from {ckpt} at AutoPrune step {trainer.step_count}")
    else:  # step 0 on disk: a kill before the first periodic checkpoint still resumes exactly
        trainer.save(ckpt, run_config=job.run_config())
    trainer.fit(splits.train, splits.heldout if job.autoprune.mode == "bilevel" else None, job.prune_steps,
                eval_data=splits.test, eval_every=job.eval_every, progress=job.progress, checkpoint=ckpt,
                checkpoint_every=job.checkpoint_every, resume=False, run_config=job.run_config())
    pruned_before_ft = accuracy(trainer.model, splits.test)
    if job.finetune_steps:
        freeze_masks(trainer.model)
        train_supervised(trainer.model, splits.train, job.finetune_steps, lr=job.finetune_lr,
                         batch_size=job.autoprune.batch_size, seed=job.seed + 7, progress=job.progress,
                         desc="finetune")
    model = trainer.model
    pruned_acc = accuracy(model, splits.test)
    magnitude_acc = magnitude_baseline(job, splits, out / "parent.pt", trainer.density()) if job.baseline else None
    report = sparsity_report(model, splits.test.tensors[0][:2].to(job.device))
    final = finalize(model)
    save_atomic(final.state_dict(), out / "model.pt")
    plot_curves(trainer.history, dense_acc, out / "curves.png")

    result = {
        "model": job.model,
        "data": job.data,
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "pruned_accuracy_before_finetune": pruned_before_ft,
        "compression": report.compression,
        "density": report.density,
        "flops_fraction": report.flops_fraction,
        "layers": report.to_dict()["layers"],
        "config": {k: v for k, v in vars(job).items() if k != "autoprune"} | {"autoprune": job.autoprune.to_dict()},
        "resumed": resuming,
        "seconds": time.perf_counter() - start,
    }
    if magnitude_acc is not None:
        result["magnitude_accuracy"] = magnitude_acc
    (out / "report.json").write_text(json.dumps(result, indent=2))
    log(report.table())
    log(
        f"dense accuracy {100 * dense_acc:.2f}%  ->  pruned {100 * pruned_acc:.2f}% "
        f"({100 * (pruned_acc - dense_acc):+.2f} points), compression {report.compression:.1f}x, "
        f"FLOPs {100 * report.flops_fraction:.1f}% of dense, {result['seconds']:.0f} s"
    )
    if magnitude_acc is not None:
        log(f"global magnitude pruning at the same density, fine-tuned as long: {100 * magnitude_acc:.2f}%")
    log(f"wrote {out / 'report.json'}, {out / 'model.pt'}, {out / 'curves.png'}")
    return result
