"""Test set-up shared by every test module.

Without a GPU, Triton kernels run through the interpreter on CPU tensors; the variable must be set
before any Triton kernel is defined, hence here, before the package is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import autoprune_ext  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
