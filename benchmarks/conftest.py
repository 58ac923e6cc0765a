"""Benchmark set-up shared by every benchmark module.

Without a GPU, Triton kernels run through the interpreter on CPU tensors (the benchmarks then are
smoke tests); the variable must be set before any Triton kernel is defined, hence here.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
