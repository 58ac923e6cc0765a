"""Wanda: input norms from hooks, scores, the aux initialiser and the one-shot baseline pruner."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import autoprune_ext as ap
from autoprune_ext import wanda
from autoprune_ext.pruners import get_pruner, keep_ratio


def test_linear_norms_are_exact_and_hooks_are_removed():
    layer = nn.Linear(3, 2)
    model = nn.Sequential(layer)
    x1 = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    x2 = torch.tensor([[[0.0, 2.0, 2.0]]])  # extra leading dims are tokens
    norms = wanda.collect_input_norms(model, [x1, (x2,)])
    want = torch.tensor([(1 + 9) ** 0.5, (4 + 4) ** 0.5, (1 + 4) ** 0.5])
    torch.testing.assert_close(norms["0"], want)
    assert not layer._forward_hooks and model.training


def test_conv_norms_match_unfold():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    norms = wanda.collect_input_norms(nn.Sequential(conv), [x])
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # [4, 18, 25]
    torch.testing.assert_close(norms["0"], cols.square().sum(dim=(0, 2)).sqrt())
    assert wanda.wanda_scores(conv.weight, norms["0"]).shape == conv.weight.shape


def test_dict_batches_and_forward_fn():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.proj(features)

    norms = wanda.collect_input_norms(KW(), [{"features": torch.tensor([[3.0, 4.0]])}])
    torch.testing.assert_close(norms["proj"], torch.tensor([3.0, 4.0]))
    norms = wanda.collect_input_norms(KW(), [torch.tensor([[1.0, 0.0]])], forward_fn=lambda m, b: m(features=2 * b))
    torch.testing.assert_close(norms["proj"], torch.tensor([2.0, 0.0]))


def test_no_activation_is_kept():
    model = nn.Sequential(nn.Linear(64, 64))
    big = torch.randn(512, 64)
    norms = wanda.collect_input_norms(model, [big])
    del big
    gc.collect()
    assert all(t.numel() == 64 for t in norms.values())


def test_init_keeps_exact_per_row_count_and_differs_from_magnitude():
    layer = ap.convert(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, 0.4, 0.3], [0.2, 0.1, 1.0, 0.9], [0.5, 0.5, 0.5, 0.5]]))
    # feature 3 has a huge input norm: Wanda keeps the small weights on it, magnitude would not
    x = torch.zeros(2, 4)
    x[:, 3] = 100.0
    x[:, 0] = 1.0
    x[:, 1] = 1.0
    x[:, 2] = 1.0
    wanda.wanda_init(layer, [x], density=0.5)
    kept = layer.weight_aux >= 0
    assert kept.sum(1).tolist() == [2, 2, 2]
    assert kept[0].tolist() == [True, False, False, True]  # magnitude would keep columns 0 and 1
    assert torch.all(layer.weight_aux.abs() >= wanda.MARGIN)


def test_init_unit_and_nm_granularity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    ap.convert(model, include=["0"], granularity="unit")
    ap.convert(model, include=["4"], granularity="2:4")
    norms = wanda.wanda_init(model, [torch.randn(16, 8)], density=0.5)
    assert int((model[0].weight_aux >= 0).sum()) == 3
    assert model[4].kept() == 4 * 8 // 2
    score = wanda.wanda_scores(model[4].weight, norms["4"]).reshape(-1, 4)
    kept = model[4].mask().reshape(-1, 4)
    top2 = torch.zeros_like(kept).scatter_(1, score.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)  # the 2:4 choice is Wanda's in every group
    with pytest.raises(ValueError, match="density"):
        wanda.wanda_init(model, [torch.randn(2, 8)], density=0.0)
    with pytest.raises(ValueError, match="batches"):
        wanda.collect_input_norms(model, [])


def blobs(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 10, generator=g)
    return TensorDataset(x, y)


def test_wanda_pruner_through_the_registry():
    torch.manual_seed(0)
    model = ap.convert(nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3)))
    pruner = get_pruner("wanda", batch_size=32, batches=2)
    pruner.prune(model, 0.4, blobs(96, 0))
    assert keep_ratio(model) == pytest.approx(0.4, rel=0.01)
    kept = model[0].mask().sum(1)
    assert int(kept.max() - kept.min()) <= 1  # the same fraction of every row
    with pytest.raises(ValueError, match="data"):
        pruner.prune(model, 0.3)
