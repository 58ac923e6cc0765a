"""Pruners that write masks into the same masked layers AutoPrune trains: global magnitude
(``torch.nn.utils.prune``) and the four baselines of *Lost in Pruning* (WT, SiPP, FT, PFP)."""

from .base import Pruner, keep_ratio, parameter_counts
from .ft import FTPruner
from .magnitude import global_magnitude_prune, prunable_layers
from .pfp import PFPPruner
from .registry import PRUNERS, get_pruner, pruner_names, register_pruner
from .sipp import SiPPPruner
from .wt import WTPruner

__all__ = [
    "PRUNERS", "FTPruner", "PFPPruner", "Pruner", "SiPPPruner", "WTPruner", "get_pruner", "global_magnitude_prune",
    "keep_ratio", "parameter_counts", "prunable_layers", "pruner_names", "register_pruner",
]
