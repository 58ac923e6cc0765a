"""Shared machinery of the baseline pruners WT, SiPP, FT and PFP (``shared/docs/evaluation.md`` §1).

* argument checks (``keep``, ``data``, masked layers);
* layer inputs captured by forward pre-hooks and unfolded into patches, the relative contributions
  ``g_ij(x, p)`` of SiPP and PFP, and the sample-set size ``|S|``;
* :class:`Budget`: exact counting of the nonzero parameters a candidate mask would leave (the
  number :func:`~autoprune_ext.pruners.base.keep_ratio` reports), so the searches never touch the model;
* :func:`trace`: a dataflow graph of the masked layers (which input positions of which layer each
  output unit reaches), used to zero what a structured prune left dead (:func:`close_dead`);
* :class:`StructuredSearch`: the ratio matching of the structured methods (FT, PFP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset, TensorDataset

from ..nn import MaskedModule
from .base import masked_layers

#: failure probability of the sampling bounds (``delta`` of the spec)
DELTA = 1e-16
#: allowed relative deviation of the achieved keep ratio from the requested one
TOL = 0.005
#: denominators ``z`` at or below this count as zero (their term of ``g`` is 0)
Z_EPS = 1e-30
#: elements of the largest intermediate tensor of a score computation (memory cap)
CHUNK_ELEMS = 1 << 22

# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def check_keep(keep: float) -> float:
    """``keep`` as a float in ``(0, 1]``, else ValueError."""
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep!r}")
    return value


def prunable(model: nn.Module) -> list[tuple[str, MaskedModule]]:
    """The masked layers of ``model``; ValueError if there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = list(masked_layers(model))
    if not layers:
        raise ValueError("model: has no masked layer; call autoprune_ext.convert(model) first")
    return layers


def is_weight_granular(layer: MaskedModule) -> bool:
    """Whether ``layer`` has one mask entry per weight (else one per output unit)."""
    return tuple(layer.weight_aux.shape) == tuple(layer.weight.shape)


def require_weight_granularity(layers: Sequence[tuple[str, MaskedModule]], method: str) -> None:
    """ValueError naming the first unit-granularity layer (``method`` needs per-weight masks)."""
    for name, layer in layers:
        if not is_weight_granular(layer):
            raise ValueError(
                f"model: {method} needs weight-granularity masks, but layer {name!r} has unit granularity; "
                "convert the model with granularity='weight'"
            )


def images_of(data: Dataset | Tensor | None, method: str) -> Tensor:
    """The images of ``data`` (a TensorDataset, any dataset of ``(image, label)`` pairs, or a
    tensor of images); ValueError naming ``data`` when it is missing or empty."""
    if data is None:
        raise ValueError(
            f"data: {method} computes data-informed scores and needs held-out samples "
            "(a TensorDataset of images and labels), got None"
        )
    if isinstance(data, Tensor):
        images = data
    elif isinstance(data, TensorDataset):
        images = data.tensors[0]
    else:
        try:
            items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"data: expected a sized dataset of (image, label) pairs, got {type(data).__name__}"
            ) from None
        firsts = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        images = torch.stack(firsts) if firsts else torch.empty(0)
    if images.dim() < 1 or images.shape[0] == 0:
        raise ValueError(f"data: {method} needs at least one held-out sample, got an empty dataset")
    return images


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# patches and relative contributions
# ---------------------------------------------------------------------------------------------


def _conv_pads(layer: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last dim first) that realise the layer's padding explicitly."""
    pads: list[int] = []
    for d in reversed(range(len(layer.kernel_size))):
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                lo = hi = 0
            else:  # "same"
                total = layer.dilation[d] * (layer.kernel_size[d] - 1)
                lo, hi = total // 2, total - total // 2
        else:
            lo = hi = int(layer.padding[d])
        pads += [lo, hi]
    return pads


def patches(layer: MaskedModule, a: Tensor) -> Tensor:
    """Input patches of ``layer`` for a batch of inputs ``a``: ``[B, J, P]`` where ``J`` indexes the
    columns of ``weight.reshape(out, -1)`` (input channel-major, then kernel position, as the weight
    is laid out) and ``P`` the output positions. A linear layer has one patch per sample (or one per
    leading position for inputs with more than two dimensions)."""
    if isinstance(layer, nn.Linear):
        b = a.shape[0]
        return a.reshape(b, -1, a.shape[-1]).transpose(1, 2)
    if not isinstance(layer, nn.modules.conv._ConvNd):
        raise TypeError(f"layer: unsupported masked layer {type(layer).__name__}")
    if layer.groups != 1:
        raise ValueError(f"layer: grouped convolutions (groups={layer.groups}) are not supported")
    nd = len(layer.kernel_size)
    if nd not in (1, 2):
        raise ValueError(f"layer: only 1-d and 2-d convolutions are supported, got {nd}-d")
    pads = _conv_pads(layer)
    if any(pads):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        a = F.pad(a, pads, mode=mode)
    if nd == 1:  # a 1-d conv is a 2-d conv over a height-1 image
        a = a.unsqueeze(2)
        k, dil, st = (1, layer.kernel_size[0]), (1, layer.dilation[0]), (1, layer.stride[0])
    else:
        k, dil, st = layer.kernel_size, layer.dilation, layer.stride
    return F.unfold(a, k, dilation=dil, stride=st)


def split_signs(a: Tensor) -> Tensor:
    """Inputs that can be negative as two points each, ``a+ = max(a, 0)`` then ``a- = max(-a, 0)``
    (stacked along the batch); non-negative inputs are returned as they are."""
    if bool((a < 0).any()):
        return torch.cat([a.clamp(min=0), (-a).clamp(min=0)], dim=0)
    return a


@dataclass
class Contributions:
    """The pieces of ``g_ij(x, p) = max(W+_ij a_jp / z+_ip, W-_ij a_jp / z-_ip)`` for non-negative
    patches ``a`` ``[B, J, P]``: ``w_pos = W+``, ``w_neg = |W-|`` (``[out, J]``) and the inverse
    denominators ``inv_pos = 1 / z+``, ``inv_neg = 1 / |z-|`` (``[B, out, P]``, 0 where ``z ~ 0``).
    As ``W_ij`` has one sign, ``g_ij(x, p) = w_pos_ij a_jp inv_pos_ip + w_neg_ij a_jp inv_neg_ip``."""

    w_pos: Tensor
    w_neg: Tensor
    inv_pos: Tensor
    inv_neg: Tensor

    @classmethod
    def of(cls, weight2d: Tensor, a: Tensor) -> Contributions:
        w_pos, w_neg = weight2d.clamp(min=0), (-weight2d).clamp(min=0)

        def inv(z: Tensor) -> Tensor:
            return torch.where(z > Z_EPS, 1.0 / z.clamp(min=Z_EPS), torch.zeros((), dtype=z.dtype, device=z.device))

        return cls(w_pos, w_neg, inv(torch.matmul(w_pos, a)), inv(torch.matmul(w_neg, a)))

    def max_mean_over_patches(self, a: Tensor) -> Tensor:
        """``max_x mean_p g_ij(x, p)`` over the samples of the batch: ``[out, J]``. As ``W_ij`` has one
        sign, ``max_x`` of ``|W_ij| mean_p a_jp inv_ip`` is ``|W_ij|`` times the max of the mean."""
        at = a.transpose(1, 2)
        p = a.shape[2]
        pos = torch.matmul(self.inv_pos, at).amax(dim=0)  # [out, J]
        neg = torch.matmul(self.inv_neg, at).amax(dim=0)
        return (self.w_pos * pos + self.w_neg * neg) / p

    def max_over_units_and_patches(self, a: Tensor) -> Tensor:
        """``max_{i, p} g_ij(x, p)`` for every sample: ``[B, J]``. Uses ``a >= 0``:
        ``max_{i,p} w_ij a_jp inv_ip = max_p a_jp max_i (w_ij inv_ip)``, blocked over ``i``."""
        b, j, p = a.shape
        out = self.w_pos.shape[0]
        best = torch.zeros(b, j, p, dtype=a.dtype, device=a.device)
        block = max(1, CHUNK_ELEMS // max(b * j * p, 1))
        for w, inv in ((self.w_pos, self.inv_pos), (self.w_neg, self.inv_neg)):
            for s in range(0, out, block):
                prod = w[s:s + block, None, :, None] * inv[:, s:s + block, None, :].transpose(0, 1)
                best = torch.maximum(best, prod.amax(dim=0))
        return (a * best).amax(dim=2)


def sample_size(eta: int, eta_max: int, delta: float = DELTA) -> int:
    """``|S| = ceil(3 ln(8 eta_max / (delta / eta)))`` (``eta``: output activations per sample over all
    masked layers, ``eta_max``: the largest layer's)."""
    if eta < 1 or eta_max < 1:
        raise ValueError(f"eta, eta_max: expected positive counts, got {eta}, {eta_max}")
    return int(math.ceil(3.0 * math.log(8.0 * eta_max * eta / delta)))


def choose_samples(images: Tensor, graph: Graph, delta: float, max_samples: int | None) -> Tensor:
    """The first ``|S|`` images: the spec's size, capped at half of ``images`` (at least 1) and at
    ``max_samples`` when given."""
    sizes = [graph.out_numel[layer] for layer in graph.order]
    n = sample_size(sum(sizes), max(sizes), delta)
    n = min(n, max(1, images.shape[0] // 2))
    if max_samples is not None:
        n = min(n, max(1, int(max_samples)))
    return images[:n]


@torch.no_grad()
def layer_inputs(
    model: nn.Module, layers: Sequence[MaskedModule], images: Tensor, batch_size: int = 32
) -> Iterator[dict[MaskedModule, Tensor]]:
    """Run ``model`` (eval mode, no grad) over ``images`` in chunks and yield, per chunk, each masked
    layer's input ``[B, ...]``. A layer called more than once per forward gets its calls stacked along
    the batch (each call is one more point)."""
    captured: dict[MaskedModule, list[Tensor]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.setdefault(module, []).append(args[0].detach())  # type: ignore[arg-type]

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    was_training = model.training
    device = model_device(model)
    model.eval()
    step = max(1, int(batch_size))
    try:
        for s in range(0, images.shape[0], step):
            captured.clear()
            model(images[s:s + step].to(device))
            yield {layer: torch.cat(captured[layer]) for layer in layers if layer in captured}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def effective_weight2d(layer: MaskedModule) -> Tensor:
    """The current masked weight as ``[out, J]`` in float64."""
    w = layer.masked_weight().to(torch.float64)
    return w.reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# exact counting of candidate masks
# ---------------------------------------------------------------------------------------------


class Budget:
    """Counts the nonzero parameters a candidate mask leaves, exactly as
    :func:`~autoprune_ext.pruners.base.parameter_counts` will (masked weights: kept and nonzero;
    every other parameter: nonzero; ``weight_aux`` not counted)."""

    def __init__(self, model: nn.Module, layers: Sequence[MaskedModule]) -> None:
        self.layers = list(layers)
        aux_ids = {id(m.weight_aux) for _, m in masked_layers(model)}
        weight_ids = {id(m.weight) for _, m in masked_layers(model)}
        #: per masked layer: currently kept and nonzero weights, in the weight's shape
        self.alive: dict[MaskedModule, Tensor] = {m: m.masked_weight() != 0 for m in self.layers}
        self._block: dict[MaskedModule, Tensor] = {}
        self.total = 0
        masked_nonzero = 0
        other_nonzero = 0
        for p in model.parameters():
            if id(p) in aux_ids:
                continue
            self.total += p.numel()
            if id(p) in weight_ids:
                continue
            other_nonzero += int((p != 0).sum())
        for _, m in masked_layers(model):
            if m not in self.alive:  # masked layers this method does not prune stay as they are
                masked_nonzero += int((m.masked_weight() != 0).sum())
        #: nonzero parameters outside the pruned layers' weights
        self.fixed = other_nonzero + masked_nonzero

    def block(self, m: MaskedModule) -> Tensor:
        """``[out, in]`` number of alive weights of each (output unit, input channel) of ``m``."""
        if m not in self._block:
            a = self.alive[m]
            self._block[m] = a.reshape(a.shape[0], a.shape[1], -1).sum(-1).to(torch.float64).cpu()
        return self._block[m]

    def target(self, keep: float) -> tuple[float, float]:
        """The requested count ``keep * total`` and the allowed deviation (0.5% relative, with a margin)."""
        t = keep * self.total
        return t, TOL * 0.98 * t

    def structured_count(self, rows: dict[MaskedModule, Tensor], cols: dict[MaskedModule, Tensor],
                         zeroed: dict[int, tuple[nn.Parameter, Tensor]]) -> int:
        """Nonzero parameters if layer ``l`` keeps output units ``rows[l]`` and input channels ``cols[l]``
        (bool vectors) and the ``zeroed`` entries of other parameters are set to zero."""
        n = self.fixed
        for m in self.layers:
            n += int(round(float(rows[m].to(torch.float64) @ self.block(m) @ cols[m].to(torch.float64))))
        for p, z in zeroed.values():
            n -= int(((p.detach() != 0) & z.to(p.device)).sum())
        return n


def within(count: float, target: float, tol: float) -> bool:
    """Whether ``count`` is within ``tol`` of ``target``."""
    return abs(count - target) <= tol


# ---------------------------------------------------------------------------------------------
# dataflow graph of the masked layers
# ---------------------------------------------------------------------------------------------

#: leaf modules that act on each channel (dim 1) separately and keep a constant channel constant
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
#: per-channel normalisations: channelwise, with per-channel affine parameters
_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
#: functions (called outside leaf modules) that act per channel on their first argument
_CHANNELWISE_FNS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu",
    "mish", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "softplus",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "contiguous", "clone", "detach", "to", "float", "double", "half", "batch_norm", "instance_norm",
    "clamp", "clamp_", "clip",
})
#: arithmetic that is channelwise when every other tensor operand is a scalar
_SCALAR_FNS = frozenset({
    "__mul__", "__rmul__", "mul", "mul_", "__imul__", "__truediv__", "div", "div_", "__itruediv__",
    "__add__", "__radd__", "add", "add_", "__iadd__", "__sub__", "__rsub__", "sub", "sub_", "__isub__",
    "__neg__", "neg",
})
_RESHAPE_FNS = frozenset({"flatten", "view", "reshape"})
_CAT_FNS = frozenset({"cat", "concat", "concatenate"})


def _tensors(obj: Any) -> list[Tensor]:
    """Tensors found in (nested tuples / lists / dicts of) ``obj``, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@dataclass
class _Node:
    """One recorded step of the forward: a leaf module call or a function called outside leaf modules."""

    module: nn.Module | None
    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Tensor]
    outputs: list[Tensor]

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "") if self.fn is not None else ""


class _Recorder(TorchFunctionMode):
    """Records the functions called outside leaf modules (``torch.flatten``, ``+``, ``torch.cat``...)."""

    def __init__(self, nodes: list[_Node], depth: list[int]) -> None:
        super().__init__()
        self.nodes, self.depth = nodes, depth

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth[0] == 0:
            outs = _tensors(out)
            ins = _tensors((args, kwargs))
            if outs and ins:
                self.nodes.append(_Node(None, func, args, kwargs, ins, outs))
        return out


@dataclass
class Edge:
    """Output unit ``unit[k]`` of a producer reaches input position ``pos[k]`` (dim 1) of ``consumer``
    only through channelwise operations."""

    consumer: MaskedModule
    unit: Tensor
    pos: Tensor


@dataclass
class Downstream:
    """Where a masked layer's output units go: masked consumers through channelwise paths
    (``edges``), whether some path leaves that simple case (``escapes``: the model output, a residual
    ``+``, an unknown op), and the per-unit parameters on those paths (its own bias, the affine
    parameters of norms): ``(parameter, unit, index)`` triples."""

    edges: list[Edge] = field(default_factory=list)
    escapes: bool = False
    params: list[tuple[nn.Parameter, Tensor, Tensor]] = field(default_factory=list)


@dataclass
class Graph:
    """Dataflow of the masked layers for one forward (see :func:`trace`)."""

    #: masked layers in execution order
    order: list[MaskedModule]
    #: per masked layer, where its units go
    down: dict[MaskedModule, Downstream]
    #: output elements per sample of each masked layer
    out_numel: dict[MaskedModule, int]
    #: output positions (patches) per sample of each masked layer (1 for a linear layer)
    positions: dict[MaskedModule, int]

    @property
    def output_layer(self) -> MaskedModule:
        """The last masked layer executed: the class-output (logits) layer."""
        return self.order[-1]


def _reshape_map(t_in: Tensor, t_out: Tensor, unit: Tensor, pos: Tensor) -> tuple[Tensor, Tensor] | None:
    """Positions after a reshape: unchanged if dims 0-1 are kept, ``c -> c*s .. c*s+s-1`` for a flatten
    of ``[N, C, *S]`` into ``[N, C*s]``; ``None`` for anything else."""
    if t_in.dim() < 2 or t_out.dim() < 2 or t_in.shape[0] != t_out.shape[0]:
        return None
    if tuple(t_out.shape[:2]) == tuple(t_in.shape[:2]):
        return unit, pos
    s = math.prod(t_in.shape[2:])
    if t_out.dim() == 2 and t_out.shape[1] == t_in.shape[1] * s:
        offs = torch.arange(s)
        return unit.repeat_interleave(s), (pos[:, None] * s + offs[None, :]).reshape(-1)
    return None


def _same_channels(t_in: Tensor, t_out: Tensor) -> bool:
    return t_in.dim() >= 2 and t_out.dim() >= 2 and t_in.shape[:2] == t_out.shape[:2]


def _consumes(layer: MaskedModule, t: Tensor) -> bool:
    """Whether input ``t`` of ``layer`` carries its input channels along dim 1."""
    if isinstance(layer, nn.Linear):
        return t.dim() == 2
    return isinstance(layer, nn.modules.conv._ConvNd) and t.dim() == len(layer.kernel_size) + 2


@torch.no_grad()
def trace(model: nn.Module, example: Tensor) -> Graph:
    """Run ``model`` once on ``example`` (eval mode, no grad) and build the dataflow :class:`Graph` of its
    masked layers. Handled: leaf modules that act per channel (activations, pools, dropout, identity,
    batch / instance norm), flatten / view / reshape to ``[N, C*s]``, ``torch.cat`` and arithmetic with
    scalars. Any other use of a tensor (in particular residual additions of two tensors) marks the
    producing layer as ``escapes``: its units are not considered dead there."""
    nodes: list[_Node] = []
    depth = [0]
    pending: dict[nn.Module, list[Tensor]] = {}
    order: list[MaskedModule] = []
    out_numel: dict[MaskedModule, int] = {}
    positions: dict[MaskedModule, int] = {}

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        if depth[0] == 0:
            pending[module] = _tensors(args)
        depth[0] += 1

    def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            nodes.append(_Node(module, None, args, {}, pending.pop(module, []), _tensors(out)))
            if isinstance(module, MaskedModule) and isinstance(out, Tensor):
                if module not in out_numel:
                    order.append(module)
                n = out.shape[0] if out.dim() > 1 else 1
                out_numel[module] = out.numel() // max(n, 1)
                positions[module] = max(out.numel() // max(n * module.weight.shape[0], 1), 1)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    was_training = model.training
    model.eval()
    try:
        with _Recorder(nodes, depth):
            result = model(example.to(model_device(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    consumers: dict[int, list[_Node]] = {}
    for node in nodes:
        for t in {id(t): t for t in node.inputs}.values():
            consumers.setdefault(id(t), []).append(node)
    outputs = {id(t) for t in _tensors(result)}
    down = {m: _downstream(m, nodes, consumers, outputs) for m in order}
    return Graph(order, down, out_numel, positions)


def _downstream(layer: MaskedModule, nodes: list[_Node], consumers: dict[int, list[_Node]],
                outputs: set[int]) -> Downstream:
    """Follow the output units of ``layer`` through channelwise operations to masked consumers."""
    d = Downstream()
    n_out = layer.weight.shape[0]
    units = torch.arange(n_out)
    if getattr(layer, "bias", None) is not None:
        d.params.append((layer.bias, units, units))
    out_node = next((n for n in reversed(nodes) if n.module is layer), None)
    if out_node is None or not out_node.outputs:
        d.escapes = True
        return d
    queue: list[tuple[Tensor, Tensor, Tensor]] = [(out_node.outputs[0], units, units.clone())]
    seen: set[tuple[int, int]] = set()
    while queue:
        t, unit, pos = queue.pop()
        if id(t) in outputs:
            d.escapes = True
        for node in consumers.get(id(t), []):
            if (id(node), id(t)) in seen:
                continue
            seen.add((id(node), id(t)))
            nxt = _through(node, t, unit, pos, d)
            if nxt is None:
                d.escapes = True
                continue
            for item in nxt:
                if item[0] is not t:  # in-place ops: the consumers of ``t`` are already visited
                    queue.append(item)
    return d


def _through(node: _Node, t: Tensor, unit: Tensor, pos: Tensor,
             d: Downstream) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Where positions ``pos`` of ``t`` land after ``node`` (``[]``: a masked consumer, recorded in
    ``d``); ``None`` if ``node`` is not a handled channelwise step."""
    m = node.module
    if m is not None:
        if not node.inputs or node.inputs[0] is not t or not node.outputs:
            return None
        out = node.outputs[0]
        if isinstance(m, MaskedModule):
            if not _consumes(m, t):
                return None
            d.edges.append(Edge(m, unit, pos))
            return []
        if isinstance(m, _NORM_MODULES) and _same_channels(t, out):
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    d.params.append((p, unit, pos))
            return [(out, unit, pos)]
        if isinstance(m, _CHANNELWISE_MODULES) and _same_channels(t, out):
            return [(out, unit, pos)]
        if isinstance(m, nn.Flatten):
            mapped = _reshape_map(t, out, unit, pos)
            return None if mapped is None else [(out, *mapped)]
        return None
    name = node.name
    out = node.outputs[0]
    first = node.args[0] if node.args else None
    if name in _CHANNELWISE_FNS:
        if first is t and _same_channels(t, out):
            return [(out, unit, pos)]
        return None
    if name in _SCALAR_FNS:
        others = [x for x in node.inputs if x is not t]
        if all(x.numel() <= 1 for x in others) and _same_channels(t, out):
            return [(out, unit, pos)]
        return None
    if name in _RESHAPE_FNS and first is t:
        mapped = _reshape_map(t, out, unit, pos)
        return None if mapped is None else [(out, *mapped)]
    if name in _CAT_FNS and isinstance(first, (list, tuple)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if out.dim() < 2 or dim % out.dim() != 1:
            return None
        res, offset = [], 0
        for x in first:
            if x is t:
                res.append((out, unit, pos + offset))
            offset += x.shape[1]
        return res
    return None


def example_input(model: nn.Module, layers: Sequence[MaskedModule], data: Dataset | Tensor | None,
                  input_shape: Sequence[int] | None = None) -> Tensor:
    """One input for :func:`trace`: the first image of ``data``, else zeros of ``input_shape``, else a
    guess from the first masked layer (``[1, in_features]`` for a linear layer, a 32-pixel image for a
    convolution)."""
    if data is not None:
        return images_of(data, "trace")[:1]
    if input_shape is not None:
        return torch.zeros(1, *[int(s) for s in input_shape])
    first = layers[0]
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features)
    nd = len(first.kernel_size)  # type: ignore[attr-defined]
    return torch.zeros(1, first.in_channels, *([32] * nd))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# dead units and structured plans
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A structured decision: kept output units (``rows``) and input channels (``cols``) per masked
    layer, and the entries of other parameters to zero (``zeroed``: ``id(param) -> (param, mask)``)."""

    rows: dict[MaskedModule, Tensor]
    cols: dict[MaskedModule, Tensor]
    zeroed: dict[int, tuple[nn.Parameter, Tensor]]


def close_dead(graph: Graph | None, rows: dict[MaskedModule, Tensor], cols: dict[MaskedModule, Tensor]) -> Plan:
    """Complete a structured decision with what it left dead, to a fixpoint (``rows``/``cols`` are
    modified in place):

    1. a pruned output unit makes the consumer positions it reaches constant: those input channels of
       the (weight-granularity) consumers are pruned;
    2. a unit of a layer that does not escape (see :class:`Downstream`) whose every consumer position
       is pruned is never used: the unit is pruned;
    3. the bias and norm parameters of the units that are pruned and unused are zeroed.

    Handled (see :func:`trace`): chains of masked layers through activations, pools, dropout, batch /
    instance norm, identity, flatten / view / reshape to ``[N, C*s]``, scalar arithmetic, and
    ``torch.cat`` along channels (DenseNet: a unit is dead only when every later layer that reads it has
    it pruned). Not handled, conservatively (nothing is masked or zeroed beyond rule 1):

    * residual sums (ResNet / WRN): the sum of two tensors is an escape, so a block's second conv, a
      projection shortcut and the stem feed the residual stream and are never declared dead; a pruned
      filter there still adds its norm's bias to the stream, and the layers reading the stream keep
      those input channels (the sum is not constant). Inside a block (``conv1 -> bn1 -> relu -> conv2``)
      both rules apply; rule 1 also applies to the stem's direct consumer (the first block's conv1);
    * consumers with unit-granularity masks (their input channels cannot be masked), slicing,
      grouped convolutions, and any other operation (each counts as an escape)."""
    zeroed: dict[int, tuple[nn.Parameter, Tensor]] = {}
    if graph is None:
        return Plan(rows, cols, zeroed)
    consumers_ok = {m: is_weight_granular(m) for m in graph.order}
    changed = True
    while changed:
        changed = False
        for layer in graph.order:
            d = graph.down[layer]
            if layer not in rows:
                continue
            for e in d.edges:  # rule 1
                if e.consumer not in cols or not consumers_ok[e.consumer]:
                    continue
                hit = e.pos[~rows[layer][e.unit]]
                if hit.numel() and bool(cols[e.consumer][hit].any()):
                    cols[e.consumer][hit] = False
                    changed = True
            if d.escapes or not d.edges:
                continue
            live, reached = _liveness(layer, d, cols, consumers_ok)
            new = rows[layer] & (live | ~reached)  # rule 2
            if bool((new != rows[layer]).any()):
                rows[layer] = new
                changed = True
    for layer in graph.order:  # rule 3
        d = graph.down[layer]
        if layer not in rows or d.escapes or not d.edges:
            continue
        live, reached = _liveness(layer, d, cols, consumers_ok)
        dead = ~rows[layer] & ~live & reached
        if not bool(dead.any()):
            continue
        for p, unit, idx in d.params:
            sel = idx[dead[unit]]
            if sel.numel():
                entry = zeroed.setdefault(id(p), (p, torch.zeros(p.shape, dtype=torch.bool, device=p.device)))
                entry[1][sel.to(p.device)] = True
    return Plan(rows, cols, zeroed)


def _liveness(layer: MaskedModule, d: Downstream, cols: dict[MaskedModule, Tensor],
              consumers_ok: dict[MaskedModule, bool]) -> tuple[Tensor, Tensor]:
    """Per unit of ``layer``: whether some consumer position it reaches is kept, and whether it reaches any."""
    n = layer.weight.shape[0]
    live = torch.zeros(n, dtype=torch.bool)
    reached = torch.zeros(n, dtype=torch.bool)
    for e in d.edges:
        reached[e.unit] = True
        if e.consumer in cols and consumers_ok.get(e.consumer, False):
            live[e.unit[cols[e.consumer][e.pos]]] = True
        else:  # a consumer whose input channels cannot be masked keeps everything it reads
            live[e.unit] = True
    return live, reached


@torch.no_grad()
def apply_plan(plan: Plan, layers: Sequence[MaskedModule]) -> None:
    """Write ``plan`` into the model: masks (never reviving a pruned weight) and zeroed parameters."""
    from .base import set_mask

    for m in layers:
        rows, cols = plan.rows[m].to(m.weight.device), plan.cols[m].to(m.weight.device)
        if is_weight_granular(m):
            view = (-1,) + (1,) * (m.weight.dim() - 1)
            cview = (1, -1) + (1,) * (m.weight.dim() - 2)
            keep = m.mask() & rows.reshape(view) & cols.reshape(cview)
        else:  # unit granularity: only output units can be expressed
            keep = (m.weight_aux.detach() >= 0) & rows
        set_mask(m, keep)
    for p, z in plan.zeroed.values():
        p.masked_fill_(z, 0.0)


class StructuredSearch:
    """Ratio matching of a structured method. Every pruned layer ``l`` ranks its units (output units for
    FT, input channels for PFP) best first in ``orders[l]`` and keeps its top ``k_l``; dead units are
    closed (:func:`close_dead`) and the exact count taken. ``solve`` bisects the method's internal
    parameter ``theta`` (``k_of(theta)``, non-decreasing) to the requested count and, when no value of
    ``theta`` lands within the tolerance (single units too large), moves one layer's ``k`` by as few
    units (relative to the layer's size) as needed."""

    def __init__(self, budget: Budget, graph: Graph | None, orders: dict[MaskedModule, Tensor],
                 axis: str, method: str, k_min: int = 1) -> None:
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis: expected 'rows' or 'cols', got {axis!r}")
        self.budget, self.graph, self.orders, self.axis, self.method = budget, graph, orders, axis, method
        self.k_min = k_min
        self.sizes = {m: int(o.numel()) for m, o in orders.items()}
        self._cache: dict[tuple[int, ...], int] = {}

    def plan(self, k: dict[MaskedModule, int]) -> Plan:
        rows = {m: torch.ones(m.weight.shape[0], dtype=torch.bool) for m in self.budget.layers}
        cols = {m: torch.ones(m.weight.shape[1], dtype=torch.bool) for m in self.budget.layers}
        chosen = rows if self.axis == "rows" else cols
        for m, order in self.orders.items():
            keep = torch.zeros(order.numel(), dtype=torch.bool)
            keep[order[: k[m]]] = True
            chosen[m] = keep
        return close_dead(self.graph, rows, cols)

    def count(self, k: dict[MaskedModule, int]) -> int:
        key = tuple(k[m] for m in self.orders)
        if key not in self._cache:
            p = self.plan(k)
            self._cache[key] = self.budget.structured_count(p.rows, p.cols, p.zeroed)
        return self._cache[key]

    def clamp(self, k: dict[MaskedModule, int]) -> dict[MaskedModule, int]:
        return {m: min(max(int(v), min(self.k_min, self.sizes[m])), self.sizes[m]) for m, v in k.items()}

    def solve(self, k_of: Callable[[float], dict[MaskedModule, int]], lo: float, hi: float,
              keep: float, iters: int = 100) -> dict[MaskedModule, int]:
        """Per-layer ``k`` whose count is within 0.5% (relative) of ``keep * total``; ValueError if none."""
        target, tol = self.budget.target(keep)
        k_lo, k_hi = self.clamp(k_of(lo)), self.clamp(k_of(hi))
        c_lo, c_hi = self.count(k_lo), self.count(k_hi)
        total = self.budget.total
        if c_lo > target + tol:
            raise ValueError(
                f"keep: {self.method} cannot go below keep ratio {c_lo / total:.4g} ({c_lo} of {total} "
                f"parameters: what is left at the smallest setting, incl. non-prunable biases/norms"
                f"{', the logits layer' if self.axis == 'rows' else ''}), requested {keep:.4g}"
            )
        if c_hi < target - tol:
            raise ValueError(
                f"keep: {self.method} can keep at most a ratio of {c_hi / total:.4g} ({c_hi} of {total} "
                f"parameters) on this model, requested {keep:.4g}"
            )
        for k, c in ((k_lo, c_lo), (k_hi, c_hi)):
            if within(c, target, tol):
                return k
        for _ in range(iters):  # bisection: count(k_of(lo)) < target < count(k_of(hi))
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            k_mid = self.clamp(k_of(mid))
            c_mid = self.count(k_mid)
            if within(c_mid, target, tol):
                return k_mid
            if c_mid < target:
                lo, k_lo, c_lo = mid, k_mid, c_mid
            else:
                hi, k_hi, c_hi = mid, k_mid, c_mid
            if k_lo == k_hi:
                break
        return self._refine(k_lo, k_hi, target, tol, keep)

    def _refine(self, k_lo: dict[MaskedModule, int], k_hi: dict[MaskedModule, int], target: float,
                tol: float, keep: float) -> dict[MaskedModule, int]:
        """Move a single layer up from ``k_lo`` or down from ``k_hi`` into the tolerance, with the
        smallest relative change."""
        best: tuple[float, dict[MaskedModule, int]] | None = None
        for m in self.orders:
            n = self.sizes[m]
            for start, step in ((k_lo, 1), (k_hi, -1)):
                k = dict(start)
                while True:
                    k[m] += step
                    moved = abs(k[m] - start[m]) / n
                    if k[m] > n or k[m] < min(self.k_min, n) or (best is not None and moved >= best[0]):
                        break
                    c = self.count(k)
                    if within(c, target, tol):
                        best = (moved, dict(k))
                        break
                    if (step > 0 and c > target) or (step < 0 and c < target):
                        break
        if best is None:
            lo, hi = self.count(k_lo), self.count(k_hi)
            raise ValueError(
                f"keep: {self.method} cannot match keep={keep:.4g} within {100 * TOL:.1f}% on this model: the "
                f"nearest achievable keep ratios are {lo / self.budget.total:.5g} and {hi / self.budget.total:.5g}"
            )
        return best[1]


def check_achieved(model: nn.Module, keep: float, method: str) -> float:
    """The achieved keep ratio; RuntimeError (an internal error) if it misses the tolerance."""
    from .base import keep_ratio

    achieved = keep_ratio(model)
    if abs(achieved - keep) > TOL * keep:
        raise RuntimeError(f"{method}: achieved keep ratio {achieved:.6g} misses the requested {keep:.6g}")
    return achieved
