"""``autoprune-ext potential``: the prune-potential study from the command line.

Trains the parents, runs every method's prune-retrain loop over the prune ratios, evaluates on the
nominal test set and the corrupted ones and under uniform input noise, prints the prune-potential
table and writes ``DIR/potential.json`` and PNG plots (see :mod:`autoprune_ext.evaluation.study`).
Bad arguments print one line (``autoprune-ext: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ._cli_args import check_device, check_model_and_data, check_out_dir, fail, nonneg_int, pos_float

#: settings of ``--quick``: a smoke run of a few seconds to a minute on digits
QUICK = {"dense_steps": 150, "autoprune_steps": 40, "ratios": "0.5,0.8,0.9", "corruptions": "gaussian_noise,gaussian_blur",
         "noise_draws": 2, "noise_images": 64, "noise_max": 0.6, "noise_step": 0.2}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _ratio_list(text: str) -> list[float]:
    """Prune ratios: ``0.5,0.8,0.9`` (fractions; percentages above 1 are divided by 100) or
    ``geom:FIRST_KEEP:LAST_KEEP:N`` (geometric keep ratios)."""
    from .evaluation.loop import geometric_ratios

    text = text.strip()
    try:
        if text.startswith("geom:"):
            first, last, n = text[5:].split(":")
            return [1.0 - k for k in geometric_ratios(float(first), float(last), int(n))]
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected prune ratios like 0.5,0.8,0.9 or geom:0.8:0.05:8 ({exc})") from None
    values = [v / 100.0 if v > 1.0 else v for v in values]
    if not values or any(not (math.isfinite(v) and 0.0 <= v < 1.0) for v in values):
        raise argparse.ArgumentTypeError(f"expected prune ratios in [0, 1) (or percentages below 100), got {text!r}")
    return values


def add_potential_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``potential`` subcommand (called from :data:`autoprune_ext.cli.EXTRA_COMMANDS`)."""
    p = sub.add_parser(
        "potential", help="prune potential of pruning methods on nominal, corrupted and noisy test data",
        description="Train parents, prune-retrain with every method over geometric prune ratios, evaluate on the "
                    "nominal test set, corrupted test sets and under uniform input noise; print the prune-potential "
                    "table and write DIR/potential.json and PNG plots.")
    p.add_argument("--model", default="lenet300", help="architecture (default lenet300)")
    p.add_argument("--data", default="digits", help="dataset: digits (bundled), mnist or cifar10 (default digits)")
    p.add_argument("--data-dir", default=None, help="directory holding the mnist / cifar10 files")
    p.add_argument("--methods", default="autoprune,wt,sipp,ft,pfp",
                   help="comma-separated methods: autoprune, wt, sipp, ft, pfp, magnitude (default the first five)")
    p.add_argument("--out", default=None, help="output directory (default runs/potential-<model>-<data>)")
    p.add_argument("--ratios", type=_ratio_list, default=None,
                   help="prune ratios: 0.5,0.8,0.9 or geom:FIRST_KEEP:LAST_KEEP:N (default geom:0.8:0.02:10)")
    p.add_argument("--seeds", type=_int_list, default=None, help="parent seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--corruptions", default=None,
                   help="comma-separated corruption names, or the groups all / noise / blur / none (default all)")
    p.add_argument("--severity", type=_int_list, default=None, help="corruption severities 1..5, e.g. 3 or 1,3,5 (default 3)")
    p.add_argument("--mode", choices=("cascade", "one-shot"), default="cascade",
                   help="cascade: prune the previous retrained net further; one-shot: restart from the parent")
    p.add_argument("--dense-steps", type=nonneg_int, default=None, help="parent training steps (default 1000)")
    p.add_argument("--retrain-steps", type=nonneg_int, default=None,
                   help="retraining steps per ratio (default: the parent's, learning-rate rewinding)")
    p.add_argument("--autoprune-steps", type=nonneg_int, default=None, help="AutoPrune iterations per ratio (default 300)")
    p.add_argument("--lr", type=pos_float, default=1e-3, help="Adam lr of parent training and retraining (default 1e-3)")
    p.add_argument("--batch-size", type=nonneg_int, default=64, help="batch size (default 64)")
    p.add_argument("--noise-draws", type=nonneg_int, default=None,
                   help="uniform-noise draws per image, 0 to skip the noise probe (default 10; the paper: 100)")
    p.add_argument("--noise-images", type=nonneg_int, default=None, help="test images of the noise probe, 0 for all (default 256)")
    p.add_argument("--noise-max", type=float, default=None, help="largest noise eps (default 0.7)")
    p.add_argument("--noise-step", type=pos_float, default=None, help="noise eps step (default 0.05)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch CPU threads, 0 for torch's default (1 is fastest on a busy shared machine)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke settings: 150 parent steps, 3 ratios, 2 corruptions, a small noise probe")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_potential)


def _corruption_list(text: str | None) -> list[str]:
    from .corruptions import BLUR_CORRUPTIONS, CORRUPTIONS, NOISE_CORRUPTIONS

    if text is None or text == "all":
        return list(CORRUPTIONS)
    out: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        group = {"all": CORRUPTIONS, "noise": NOISE_CORRUPTIONS, "blur": BLUR_CORRUPTIONS, "none": ()}.get(name)
        if group is not None:
            out += list(group)
        elif name in CORRUPTIONS:
            out.append(name)
        else:
            raise ValueError(f"--corruptions: unknown corruption {name!r}; choose from all, noise, blur, none, "
                             f"{', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(out))


def cmd_potential(args: argparse.Namespace) -> int:
    from .evaluation.metrics import noise_levels
    from .evaluation.study import StudyConfig, default_prune_ratios, method_available, potential_table, run_study

    bad = check_model_and_data(args)
    if bad is not None:
        return bad
    why = check_device(args.device) or check_out_dir(args.out or f"runs/potential-{args.model}-{args.data}")
    if why:
        return fail(why)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        return fail("--methods: expected at least one method")
    for m in methods:
        ok, why = method_available(m)
        if not ok:
            return fail(f"--methods: {why}")
    if args.batch_size < 1:
        return fail(f"--batch-size: expected a positive integer, got {args.batch_size}")
    quick = QUICK if args.quick else {}
    try:
        corruptions = _corruption_list(args.corruptions if args.corruptions is not None else quick.get("corruptions"))
    except ValueError as exc:
        return fail(str(exc))
    severities = args.severity or [3]
    if any(not 1 <= s <= 5 for s in severities):
        return fail(f"--severity: expected integers in 1..5, got {','.join(map(str, severities))}")
    ratios = args.ratios or (_ratio_list(quick["ratios"]) if quick else default_prune_ratios())
    noise_max = args.noise_max if args.noise_max is not None else quick.get("noise_max", 0.7)
    noise_step = args.noise_step if args.noise_step is not None else quick.get("noise_step", 0.05)
    if not (math.isfinite(noise_max) and noise_max >= 0):
        return fail(f"--noise-max: expected a non-negative number, got {noise_max}")

    def pick(value: int | None, key: str, default: int) -> int:
        return value if value is not None else int(quick.get(key, default))

    try:
        cfg = StudyConfig(
            model=args.model, data=args.data, data_dir=args.data_dir, methods=tuple(methods),
            prune_ratios=tuple(ratios), seeds=tuple(args.seeds or [0]), corruptions=tuple(corruptions),
            severities=tuple(severities), mode=args.mode,
            dense_steps=max(pick(args.dense_steps, "dense_steps", 1000), 1), retrain_steps=args.retrain_steps,
            lr=args.lr, batch_size=args.batch_size, autoprune_steps=max(pick(args.autoprune_steps, "autoprune_steps", 300), 1),
            noise_eps=tuple(noise_levels(noise_max, noise_step)), noise_draws=pick(args.noise_draws, "noise_draws", 10),
            noise_images=pick(args.noise_images, "noise_images", 256), device=args.device,
        )
    except ValueError as exc:
        return fail(str(exc).splitlines()[0])
    out = Path(args.out or f"runs/potential-{args.model}-{args.data}")
    log = (lambda s: None) if args.quiet else print
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_study(cfg, out, progress=not args.quiet, log=log)
    finally:
        torch.set_num_threads(threads)
    print(f"prune potential (%), delta 0.5%, mean over {len(cfg.seeds)} parent(s); prune ratios tested: "
          + ", ".join(f"{100 * r:.1f}" for r in result["prune_ratios"]))
    print(potential_table(result, markdown=args.markdown))
    print("prune potential at delta 0, nominal: " + ", ".join(f"{m} {100 * result['prune_potential_summary_delta0'][m]['nominal']:.1f}%"
                                   for m in result["methods"]))
    for m, errs in result.get("errors", {}).items():
        print(f"note: {m} could not reach {len(errs)} (ratio, parent) pair(s), counted as failing; e.g. "
              f"{next(iter(errs.values()))}")
    ee = result["excess_error"]
    if ee.get("methods"):
        print("excess error at 80% pruned (zero-intercept fit): "
              + ", ".join(f"{m} {100 * 0.8 * e['slope']:+.2f} pts" for m, e in ee["methods"].items()))
    print(f"wrote {out / 'potential.json'} and accuracy.png, potential.png, excess_error.png, noise.png there "
          f"in {result['seconds']:.0f} s")
    return 0
