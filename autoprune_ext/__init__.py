"""autoprune_ext: training-time pruning with learnable auxiliary masks (AutoPrune), with fused kernels.

Quick start::

    import autoprune_ext as ap
    model = ap.convert(model)                                   # Linear/Conv -> masked layers
    aux_opt = ap.optim.AuxAdam.from_model(model, lr=1e-2, penalty={"linear": 0.4, "conv": 0.2})
    ...                                                         # alternate W and M steps
    print(ap.sparsity_report(model))
    plain = ap.finalize(model)                                  # dense layers, zeros baked in
"""

from __future__ import annotations

from . import backends, functional, nn, ops, optim, reference
from .convert import LayerSparsity, SparsityReport, convert, finalize, masked_modules, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "LayerSparsity",
    "SparsityReport",
    "backends",
    "convert",
    "finalize",
    "functional",
    "masked_modules",
    "nn",
    "ops",
    "optim",
    "reference",
    "sparsity_report",
]
