"""Hugging Face transformers integration: prepare a model, save and reload it with its masks.

Nothing here imports transformers at module import; the functions use the model object they are
given (any ``transformers.PreTrainedModel``), so ``import autoprune_ext.hf`` works without it.

* :func:`prepare` converts a model in one call with defaults suited to transformers: every linear
  projection and GPT-2 ``Conv1D`` is masked, tied weights (``lm_head`` tied to the input embedding)
  and the layers named in ``exclude`` stay dense.
* :func:`save_masked` / :func:`load_masked` keep a converted model's masks across a save:
  ``save_pretrained`` writes the dense weights (``W``, not ``W * h(M)``) under the original keys, so
  the directory is a valid checkpoint of the original class, and ``autoprune_masks.safetensors``
  beside it holds every ``weight_aux`` with ``autoprune_masks.json`` (mask options, layer names,
  a SHA-256 of the mask file). Both files are data, never code.
* A finalized model (:func:`autoprune_ext.finalize`) is the original architecture with zeros baked
  in: its ``save_pretrained`` directory loads with ``from_pretrained`` of the original class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import Selector, convert, masked_modules
from .nn import AuxInit

MASKS_FILE = "autoprune_masks.safetensors"
META_FILE = "autoprune_masks.json"
FORMAT = "autoprune_ext.hf.masks"
VERSION = 1


def prepare(
    model: nn.Module,
    *,
    granularity: str = "weight",
    init: AuxInit = (0.5, 0.1),
    include: Iterable[Selector] | None = None,
    exclude: Iterable[Selector] = (),
    surrogate: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    aux_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Convert a transformers model for AutoPrune in place and return it.

    Masks every ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and GPT-2 ``Conv1D`` except tied weights
    and ``exclude`` (module-name patterns or types, e.g. ``["classifier", "*.pooler.*"]``). The aux
    is float32 unless ``aux_dtype`` says otherwise, whatever the model's dtype (a bf16 aux loses
    small Adam updates; see the README on memory options).
    """
    _check_model(model)
    return convert(model, include=include, exclude=list(exclude), granularity=granularity, init=init,
                   surrogate=surrogate, rule=rule, alpha=alpha, aux_dtype=aux_dtype)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"model: expected a transformers PreTrainedModel (with save_pretrained), got {type(model).__name__}"
        )


def _mask_meta(model: nn.Module) -> dict[str, Any]:
    layers = {}
    for name, m in masked_modules(model):
        layers[name] = {
            "type": type(m).__name__,
            "granularity": m.granularity,
            "surrogate": m.surrogate,
            "rule": m.rule,
            "alpha": m.alpha,
            "aux_shape": list(m.weight_aux.shape),
            "aux_dtype": str(m.weight_aux.dtype).removeprefix("torch."),
        }
    return layers


def save_masked(model: nn.Module, directory: str | os.PathLike[str], **save_pretrained_kwargs: Any) -> Path:
    """Save a converted transformers model so that :func:`load_masked` restores it exactly.

    ``directory`` receives ``save_pretrained``'s files (the original keys, dense ``W``: loadable by the
    original class) plus the masks. Extra keyword arguments go to ``save_pretrained``. Returns the
    directory.
    """
    from safetensors.torch import save_file

    _check_model(model)
    layers = _mask_meta(model)
    if not layers:
        raise ValueError("model: has no masked layers; prepare/convert it first (or use save_pretrained)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aux_keys = {f"{name}.weight_aux" for name in layers}
    state = {k: v for k, v in model.state_dict().items() if k not in aux_keys}
    model.save_pretrained(directory, state_dict=state, **save_pretrained_kwargs)
    tensors = {name: m.weight_aux.detach().contiguous().cpu() for name, m in masked_modules(model)}
    tmp = directory / (MASKS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, directory / MASKS_FILE)
    meta = {"format": FORMAT, "version": VERSION, "sha256": digest, "layers": layers}
    tmp_meta = directory / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, directory / META_FILE)
    return directory


def load_masked(model_cls: Any, directory: str | os.PathLike[str], **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_masked`: ``model_cls.from_pretrained(directory)`` (any
    transformers class or Auto class), then the same layers converted with the same options and
    their saved ``weight_aux``. The mask file's checksum and every layer's name, shape and dtype are
    checked; a mismatch raises ``ValueError`` naming the file and the layer."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, masks_path = directory / META_FILE, directory / MASKS_FILE
    for path in (meta_path, masks_path):
        if not path.is_file():
            raise FileNotFoundError(f"directory: {directory} has no {path.name} (was it written by save_masked?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: expected format {FORMAT!r} version {VERSION}, got "
                         f"{meta.get('format')!r} version {meta.get('version')!r}")
    if hashlib.sha256(masks_path.read_bytes()).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{masks_path}: checksum mismatch: the mask file is corrupted or does not belong to {meta_path}")
    model = model_cls.from_pretrained(directory, **from_pretrained_kwargs)
    tensors = load_file(str(masks_path))
    layers: dict[str, dict[str, Any]] = meta["layers"]
    if set(tensors) != set(layers):
        raise ValueError(f"{masks_path}: holds layers {sorted(tensors)} but {meta_path} lists {sorted(layers)}")
    modules = dict(model.named_modules())
    for name, opts in layers.items():
        if name not in modules:
            raise ValueError(f"{meta_path}: layer {name!r} does not exist in the loaded {type(model).__name__}")
        convert(model, include=[_exact(name)], granularity=opts["granularity"], init=0.0,
                surrogate=opts["surrogate"], rule=opts["rule"], alpha=opts["alpha"],
                aux_dtype=getattr(torch, opts["aux_dtype"]))
    converted = dict(masked_modules(model))
    with torch.no_grad():
        for name, aux in tensors.items():
            target = converted[name].weight_aux
            if tuple(aux.shape) != tuple(target.shape) or aux.dtype != target.dtype:
                raise ValueError(f"{masks_path}: layer {name!r}: aux {tuple(aux.shape)} {aux.dtype} does not "
                                 f"fit the model's {tuple(target.shape)} {target.dtype}")
            target.copy_(aux)
    return model


def _exact(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (layer names may contain ``[``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
