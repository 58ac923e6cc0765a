"""Masked layers, convert / finalize / sparsity_report, and the round-trips users rely on."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import backends
from autoprune_ext.nn import MaskedConv1d, MaskedConv2d, MaskedLinear, magnitude_init


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4 * 4 * 4 + 3 * 7, 5)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x1).flatten(1)
        b = self.conv2(x2).relu()
        seq = b.flatten(2).transpose(1, 2)
        b = self.attn(seq, seq, seq, need_weights=False)[0].flatten(1)
        return self.fc(torch.cat([a, b], 1))


def inputs():
    return torch.randn(2, 2, 7), torch.randn(2, 1, 8, 8)


def prune_some(model: nn.Module) -> None:
    with torch.no_grad():
        for _, m in ap.masked_modules(model):
            m.weight_aux.copy_(torch.randn_like(m.weight_aux))


def test_convert_keeps_function_and_shares_parameters():
    net = Net()
    dense = copy.deepcopy(net)
    fc_weight = net.fc.weight
    x = inputs()
    net = ap.convert(net)
    assert isinstance(net.conv1, MaskedConv1d) and isinstance(net.conv2, MaskedConv2d)
    assert isinstance(net.fc, MaskedLinear)
    assert net.fc.weight is fc_weight  # an optimiser built before convert stays valid
    assert type(net.attn.out_proj) is not MaskedLinear  # used through its weight by its owner
    assert torch.allclose(net(*x), dense(*x), atol=1e-6)  # init keeps every weight


def test_convert_include_exclude():
    net = ap.convert(Net(), include=["conv*"], exclude=[nn.Conv1d])
    assert isinstance(net.conv2, MaskedConv2d)
    assert type(net.conv1) is nn.Conv1d and type(net.fc) is nn.Linear
    with pytest.raises(ValueError, match="include"):
        ap.convert(Net(), include=["nothing.*"])
    with pytest.raises(TypeError, match="include/exclude"):
        ap.convert(Net(), include=[3])
    with pytest.raises(TypeError, match="model"):
        ap.convert("not a model")


def test_convert_root_layer_and_unit_granularity():
    layer = ap.convert(nn.Linear(6, 4), granularity="unit")
    assert isinstance(layer, MaskedLinear) and layer.weight_aux.shape == (4,)
    with torch.no_grad():
        layer.weight_aux.copy_(torch.tensor([1.0, -1.0, 0.5, -0.1]))
    x = torch.randn(3, 6)
    expected = x @ (layer.weight * torch.tensor([1.0, 0.0, 1.0, 0.0]).view(4, 1)).t() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.kept() == 12 and layer.density() == 0.5


def test_masked_layer_forward_matches_definition():
    lin = MaskedLinear(5, 3)
    prune_some(lin)
    x = torch.randn(2, 4, 5)
    assert torch.allclose(lin(x), nn.functional.linear(x, lin.weight * (lin.weight_aux >= 0), lin.bias), atol=1e-6)
    conv = MaskedConv2d(2, 3, 3, padding="same", bias=False, granularity="unit")
    prune_some(conv)
    x = torch.randn(1, 2, 6, 6)
    t = conv.weight * (conv.weight_aux >= 0).view(3, 1, 1, 1)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, t, None, padding="same"), atol=1e-6)


def test_init_options():
    torch.manual_seed(0)
    lin = MaskedLinear(50, 40, init=(0.5, 0.1))
    aux = lin.weight_aux.detach()
    assert aux.min() >= 0.3 and aux.max() <= 0.7 and abs(float(aux.mean()) - 0.5) < 0.01
    lin.reset_aux(-1.0)
    assert lin.kept() == 0
    lin.reset_aux(magnitude_init(keep=0.25))
    kept = lin.mask()
    assert abs(lin.density() - 0.25) < 0.01
    assert lin.weight.abs()[kept].min() >= lin.weight.abs()[~kept].max()
    with pytest.raises(TypeError, match="init"):
        lin.reset_aux("normal")
    with pytest.raises(ValueError, match="init"):
        lin.reset_aux(float("nan"))
    with pytest.raises(ValueError, match="keep"):
        magnitude_init(keep=0.0)


def test_finalize_loads_into_dense_architecture_strict():
    net = ap.convert(Net())
    prune_some(net)
    x = inputs()
    final = ap.finalize(net)
    assert not any(True for _ in ap.masked_modules(final))
    assert any(True for _ in ap.masked_modules(net))  # the masked model is untouched
    fresh = Net()
    fresh.load_state_dict(final.state_dict(), strict=True)
    assert torch.allclose(fresh(*x), net(*x), atol=1e-5)
    zeros = int((fresh.fc.weight == 0).sum())
    assert zeros == net.fc.weight.numel() - net.fc.kept()


def test_state_dict_deepcopy_pickle_save_roundtrip():
    net = ap.convert(Net())
    prune_some(net)
    sd = net.state_dict()
    assert {"fc.weight", "fc.bias", "fc.weight_aux", "conv2.weight_aux"} <= set(sd)
    assert "fc.weight_orig" not in sd
    x = inputs()
    y = net(*x)
    clones = [copy.deepcopy(net), pickle.loads(pickle.dumps(net))]
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    clones.append(torch.load(buf, weights_only=False))
    other = ap.convert(Net())
    other.load_state_dict(sd, strict=True)
    clones.append(other)
    for c in clones:
        assert torch.equal(c(*x), y)
        for k, v in c.state_dict().items():
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("backend_name", backends.NAMES)
def test_compile_fullgraph_forward_backward(backend_name):
    ok, why = backends.availability(backend_name, "cpu")
    if not ok:
        pytest.skip(why)
    with backends.use(backend_name):
        _check_compiled_matches_eager()


def _check_compiled_matches_eager():
    torch._dynamo.reset()
    model = ap.convert(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)))
    prune_some(model)
    x = torch.randn(2, 1, 8, 8)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


class _Spy:
    """Records the need-flags the op layer passes to the backend."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __enter__(self):
        inner = backends.get("reference")
        spy = self

        class SpyBackend(type(inner)):
            def mask_backward(self, grad, weight, aux, s, r, a, need_w, need_m):
                spy.calls.append(("mask_backward", need_w, need_m))
                return super().mask_backward(grad, weight, aux, s, r, a, need_w, need_m)

            def masked_linear_backward(self, g, x, w, m, s, r, a, ni, nw, nm, nb):
                spy.calls.append(("masked_linear_backward", ni, nw, nm, nb))
                return super().masked_linear_backward(g, x, w, m, s, r, a, ni, nw, nm, nb)

        backends.register("spy", SpyBackend)
        self._ctx = backends.use("spy")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_only_needed_gradients_are_computed():
    model = ap.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    x = torch.randn(2, 1, 6, 6)
    weights = [p for n, p in model.named_parameters() if not n.endswith("weight_aux")]
    auxes = [p for n, p in model.named_parameters() if n.endswith("weight_aux")]
    with _Spy() as spy:
        for p in weights:  # M step: W frozen
            p.requires_grad_(False)
        model(x).sum().backward()
        assert ("mask_backward", False, True) in spy.calls
        assert ("masked_linear_backward", True, False, True, False) in spy.calls
        spy.calls.clear()
        for p in weights:  # W step: M frozen
            p.requires_grad_(True)
        for p in auxes:
            p.requires_grad_(False)
        model(x).sum().backward()
        assert ("mask_backward", True, False) in spy.calls
        assert ("masked_linear_backward", True, True, False, True) in spy.calls


def test_sparsity_report_counts_and_flops():
    model = ap.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    with torch.no_grad():
        model[0].weight_aux.fill_(-1.0)
        model[0].weight_aux[0].fill_(1.0)  # 9 of 18 kept
        model[2].weight_aux.fill_(1.0)
        model[2].weight_aux[0, :8] = -1.0  # 88 of 96 kept
    report = ap.sparsity_report(model, torch.randn(2, 1, 6, 6))
    conv, fc = report.layers
    assert (conv.kept, conv.total, fc.kept, fc.total) == (9, 18, 88, 96)
    assert conv.flops_dense == 2 * 18 * 16 and fc.flops_dense == 2 * 96
    assert report.compression == pytest.approx(114 / 97)
    assert report.flops_fraction == pytest.approx((2 * 9 * 16 + 2 * 88) / (2 * 18 * 16 + 2 * 96))
    d = report.to_dict()
    assert d["layers"][0]["name"] == "0" and d["kept"] == 97
    text = str(report)
    assert "MaskedConv2d" in text and "total" in text and "1.2x" in text
    assert not ap.sparsity_report(model).flops_exact


def test_masked_layers_constructor_arguments():
    conv = MaskedConv1d(2, 4, kernel_size=3, stride=2, dilation=2, groups=2, bias=False, surrogate="sigmoid",
                        rule="chain", alpha=0.2, aux_dtype=torch.bfloat16)
    assert conv.weight_aux.dtype == torch.bfloat16 and conv.bias is None
    assert conv(torch.randn(1, 2, 11)).shape == (1, 4, 4)  # (11 - 2*2 - 1) // 2 + 1
    assert "surrogate=sigmoid" in repr(conv)
    d = conv.to_dense()
    assert type(d) is nn.Conv1d and d.groups == 2 and d.dilation == (2,)
    with pytest.raises(ValueError, match="granularity"):
        MaskedLinear(3, 2, granularity="row")
    with pytest.raises(ValueError, match="surrogate"):
        MaskedConv2d(1, 1, 1, surrogate="tanh")
    with pytest.raises(TypeError, match="module"):
        MaskedLinear.from_dense(nn.Conv2d(1, 1, 1))
