"""``autoprune-ext``: the command-line entry point.

Subcommands: ``info`` (versions, backends and why some are unusable), ``prune`` (the main job),
``potential`` (prune potential of several methods under distribution shift).
Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence

from ._cli_args import (
    check_device,
    check_model_and_data,
    check_out_dir,
    check_state_dict_file,
    fail,
    fraction,
    nonneg_float,
    nonneg_int,
)
from .potential_cli import add_potential_parser

# per-model AutoPrune defaults, tuned on digits (README: reproduction table); other models get the
# authors' LeNet-5 lambdas
MODEL_DEFAULTS: dict[str, dict[str, float | bool]] = {
    "lenet300": {"lambda_fc": 10.0, "lambda_conv": 1.0, "lr_aux": 0.1, "inv_abs_weight": True},
    "lenet5": {"lambda_fc": 4.0, "lambda_conv": 0.2, "lr_aux": 0.05, "inv_abs_weight": True},
}
GENERIC_DEFAULTS: dict[str, float | bool] = {"lambda_fc": 0.4, "lambda_conv": 0.2, "lr_aux": 0.1, "inv_abs_weight": False}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``autoprune-ext: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"autoprune-ext: error: {message}\n")
        sys.exit(2)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, backends
    from .ops import op_names

    print(f"autoprune_ext {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")
    print(f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    print("ops: " + ", ".join(op_names()))
    print("backends (name / device: status):")
    for name, per_device in backends.status().items():
        for device, text in per_device.items():
            print(f"  {name:<10} {device:<5} {text}")
    print(f"usable here: {', '.join(backends.available())}; forced: {backends.forced() or 'no (automatic)'}")
    return 0


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    from .data import DATASETS
    from .models import model_names
    from .reference import GRANULARITIES, RULES, SURROGATES

    p = sub.add_parser("prune", help="train a dense parent, prune it with AutoPrune, fine-tune, report",
                       description="Train (or load) a dense parent, run AutoPrune's alternating mask/weight "
                                   "steps, optionally fine-tune with the mask fixed, print the per-layer table "
                                   "and write report.json, model.pt (finalized) and curves.png.")
    p.add_argument("--model", default="lenet300", help=f"architecture: {', '.join(model_names())} (default lenet300)")
    p.add_argument("--data", default="digits", help=f"dataset: {', '.join(DATASETS)} (default digits, bundled)")
    p.add_argument("--data-dir", default=None, help="directory holding the mnist / cifar10 files")
    p.add_argument("--out", default=None, help="output directory (default runs/<model>-<data>-s<seed>)")
    p.add_argument("--parent", default=None, help="load the dense parent's state_dict from this file instead of training it")
    p.add_argument("--seed", type=int, default=0, help="seed of init, split and batch order (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--backend", default=None, help="force a kernel backend: reference, triton or cpp")
    p.add_argument("--dense-steps", type=nonneg_int, default=2000, help="dense parent training steps (default 2000)")
    p.add_argument("--dense-lr", type=nonneg_float, default=1e-3, help="dense parent Adam lr (default 1e-3)")
    p.add_argument("--steps", type=nonneg_int, default=1000, help="AutoPrune iterations (default 1000)")
    p.add_argument("--finetune-steps", type=nonneg_int, default=300,
                   help="fine-tuning steps with the mask fixed, 0 for none (default 300)")
    p.add_argument("--finetune-lr", type=nonneg_float, default=5e-4, help="fine-tuning lr (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of every phase (default 64)")
    p.add_argument("--lr-weight", type=nonneg_float, default=1e-3, help="lr of W during AutoPrune (default 1e-3)")
    p.add_argument("--lr-aux", type=nonneg_float, default=None,
                   help="lr of the masks M, Adam (default per model: lenet300 0.1, lenet5 0.05, others 0.1)")
    p.add_argument("--lambda-fc", type=nonneg_float, default=None,
                   help="penalty lambda of linear layers (default per model: lenet300 10, lenet5 4, others 0.4)")
    p.add_argument("--lambda-conv", type=nonneg_float, default=None,
                   help="penalty lambda of conv layers (default per model: lenet300 1, lenet5 0.2, others 0.2)")
    p.add_argument("--rho", type=nonneg_float, default=1e-3, help="recovery weight rho (default 1e-3)")
    p.add_argument("--target-density", type=fraction, default=None,
                   help="adapt lambda to reach this kept fraction instead of a fixed lambda")
    p.add_argument("--inv-abs-weight", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the penalty gradient by 1/|w| (default per model: on for lenet300 and lenet5, off otherwise)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="weight", help="mask per weight or per unit")
    p.add_argument("--surrogate", choices=SURROGATES, default="softplus", help="surrogate of dh/dm (default softplus)")
    p.add_argument("--rule", choices=RULES, default="sign", help="coarse-gradient rule (default sign)")
    p.add_argument("--mode", choices=("bilevel", "same_batch"), default="bilevel",
                   help="mask steps on held-out batches (bilevel) or on the training batch")
    p.add_argument("--freeze-bn", action="store_true", help="batch norm and dropout in eval mode while pruning")
    p.add_argument("--eval-every", type=nonneg_int, default=100, help="test accuracy every N steps (default 100)")
    p.add_argument("--baseline", action="store_true",
                   help="also run global magnitude pruning at the same density, fine-tuned as long, for comparison")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=100,
                   help="write <out>/autoprune.ckpt every N AutoPrune steps, 0 for only at the end (default 100)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out (same flags); without it a fresh run replaces it")
    p.add_argument("--allow-config-change", default="", metavar="FIELDS",
                   help="with --resume: comma-separated config fields allowed to differ from the checkpoint's "
                        "(names as printed in the refusal, e.g. autoprune.lr_aux), or 'all'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from .autoprune import AutoPruneConfig
    from .prune_job import PruneJob, run

    bad = check_model_and_data(args)
    if bad is not None:
        return bad
    out = args.out or f"runs/{args.model}-{args.data}-s{args.seed}"
    why = (check_device(args.device) or check_out_dir(out)
           or (check_state_dict_file(args.parent, "--parent") if args.parent is not None else None))
    if why:
        return fail(why)
    if args.allow_config_change and not args.resume:
        return fail("--allow-config-change: only meaningful with --resume")
    allow = [f.strip() for f in args.allow_config_change.split(",") if f.strip()]
    if args.batch_size < 1:
        return fail(f"--batch-size: expected a positive integer, got {args.batch_size}")
    defaults = MODEL_DEFAULTS.get(args.model, GENERIC_DEFAULTS)
    opt = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in GENERIC_DEFAULTS}
    config = AutoPruneConfig(
        lr_weight=args.lr_weight, lr_aux=float(opt["lr_aux"]),
        penalty={"linear": float(opt["lambda_fc"]), "conv": float(opt["lambda_conv"])}, rho=args.rho,
        inv_abs_weight=bool(opt["inv_abs_weight"]), surrogate=args.surrogate, rule=args.rule, granularity=args.granularity,
        mode=args.mode, target_density=args.target_density, freeze_bn=args.freeze_bn, batch_size=args.batch_size,
        seed=args.seed,
    )
    job = PruneJob(
        model=args.model, data=args.data, data_dir=args.data_dir,
        out=out, parent=args.parent, seed=args.seed,
        device=args.device, dense_steps=args.dense_steps, dense_lr=args.dense_lr, prune_steps=args.steps,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, eval_every=args.eval_every,
        baseline=args.baseline, progress=not args.quiet, autoprune=config,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        allow_config_change=True if allow == ["all"] else tuple(allow),
    )
    if args.backend:
        from . import backends

        with backends.use(args.backend):
            run(job)
    else:
        run(job)
    return 0


#: subcommands beside ``info``: functions adding their parser
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_prune_parser, add_potential_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoprune-ext",
                     description="Training-time pruning with learnable auxiliary masks (AutoPrune), fast kernels, "
                                 "and evaluation beyond test accuracy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="versions, registered ops, and which kernel backends are usable here")
    info.set_defaults(func=cmd_info)
    for add in EXTRA_COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError) as exc:  # bad file, directory or option: one line, status 2
        return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


if __name__ == "__main__":
    sys.exit(main())
