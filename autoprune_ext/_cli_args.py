"""Argument types and checks shared by the ``autoprune-ext`` subcommands."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path


def fail(message: str) -> int:
    """Print ``message`` as the one error line and return exit status 2."""
    sys.stderr.write(f"autoprune-ext: error: {message}\n")
    return 2


def _number(text: str, cast: Callable[[str], float], what: str, ok: Callable[[float], bool], expected: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def nonneg_int(text: str) -> int:
    return _number(text, int, "an integer", lambda v: v >= 0, "a non-negative integer")


def nonneg_float(text: str) -> float:
    return _number(text, float, "a number", lambda v: v >= 0, "a finite non-negative number")


def pos_float(text: str) -> float:
    return _number(text, float, "a number", lambda v: v > 0, "a positive number")


def fraction(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def check_model_and_data(args: argparse.Namespace) -> int | None:
    """Exit status 2 (after one error line) for an unknown model or dataset or a missing data
    directory; ``None`` when they are fine."""
    from .data import DATASETS
    from .models import model_names

    if args.model not in model_names():
        return fail(f"--model: unknown model {args.model!r}; choose from {', '.join(model_names())}")
    if args.data not in DATASETS:
        return fail(f"--data: unknown dataset {args.data!r}; choose from {', '.join(DATASETS)}")
    if args.data != "digits":
        if args.data_dir is None:
            return fail(f"--data-dir: the {args.data} dataset is read from local files; name their directory")
        if not Path(args.data_dir).is_dir():
            return fail(f"--data-dir: {args.data_dir} is not a directory")
    return None
