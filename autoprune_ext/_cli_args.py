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


def check_device(text: str) -> str | None:
    """``None`` if ``text`` names a usable compute device here, else the one-line reason."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return f"--device: expected cpu, cuda or cuda:N (a torch device), got {text!r}"
    if device.type == "meta":
        return "--device: meta tensors hold no data and cannot train; expected cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device: {text} requested, but CUDA is not available here (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device: {text} requested, but this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif device.type != "cpu":
        return f"--device: expected cpu, cuda or cuda:N, got {text!r}"
    return None


def check_out_dir(text: str) -> str | None:
    """``None`` if the output directory ``text`` exists and is writable, or could be created (checked
    on its nearest existing ancestor, so nothing is created before the run starts)."""
    import os

    path = Path(text)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        return f"--out: {text} {where}, expected a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--out: cannot write to {text} (no write permission on {probe})"
    return None


def check_state_dict_file(text: str, flag: str) -> str | None:
    """``None`` if ``text`` is a file ``torch.load(weights_only=True)`` reads as a dict of tensors."""
    import torch

    if not Path(text).is_file():
        return f"{flag}: {text} is not a file"
    try:
        state = torch.load(text, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable or unsafe file: one line naming the flag
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{flag}: {text} cannot be read as a state_dict (torch.load, weights_only=True): {first[:200]}"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        return f"{flag}: {text} holds a {type(state).__name__}, expected a state_dict (a dict of tensors)"
    return None
