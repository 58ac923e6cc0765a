"""Tests of autoprune_ext.models: shapes, parameter counts, layer hygiene, registry errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from autoprune_ext.models import MODELS, default_input_shape, get_model, model_names

ALL_MODELS = sorted(MODELS)
SMALL_MODELS = ["lenet300", "lenet5", "resnet20", "densenet22"]

# Leaf module types a model may contain (prunable layers are swapped for masked ones by type).
ALLOWED_LEAVES = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODELS) == {
        "lenet300", "lenet5", "vgg_like", "vgg16_bn", "resnet20", "resnet56", "wrn16_8", "densenet22",
    }
    assert model_names() == list(MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("shape,num_classes", [((1, 28, 28), 7), ((3, 32, 32), 10)])
def test_forward_shape_and_each_leaf_used_once(
    name: str, shape: tuple[int, int, int], num_classes: int
) -> None:
    torch.manual_seed(0)
    c, h, _ = shape
    model = get_model(name, num_classes=num_classes, in_channels=c, image_size=h)
    leaves = [m for m in model.modules() if not list(m.children())]
    bad = [type(m).__name__ for m in leaves if not isinstance(m, ALLOWED_LEAVES)]
    assert not bad, f"{name} uses disallowed leaf modules: {sorted(set(bad))}"

    calls: Counter[int] = Counter()
    handles = [m.register_forward_hook(lambda mod, i, o: calls.update([id(mod)])) for m in leaves]
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    for hd in handles:
        hd.remove()
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    # every module (in particular every prunable layer) is used exactly once per forward
    assert all(calls[id(m)] == 1 for m in leaves), name


def test_lenet_exact_parameter_counts() -> None:
    assert _n_params(get_model("lenet300")) == 266_610
    assert _n_params(get_model("lenet5")) == 431_080


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnet20", 0.27e6),
        ("densenet22", 0.07e6),
        ("wrn16_8", 10.9e6),
        ("vgg16_bn", 14.7e6),
    ],
)
def test_parameter_counts_match_papers(name: str, expected: float) -> None:
    n = _n_params(get_model(name, num_classes=10, in_channels=3))
    assert abs(n - expected) / expected < 0.10, (name, n)


def test_resnet56_is_deeper_than_resnet20() -> None:
    r20, r56 = get_model("resnet20"), get_model("resnet56")
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    # 1 stem + 2 per block + 2 projection shortcuts
    assert convs(r20) == 1 + 2 * 9 + 2
    assert convs(r56) == 1 + 2 * 27 + 2
    assert 0.8e6 < _n_params(r56) < 0.9e6


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_backward(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_lenet300_flattens_any_input() -> None:
    model = get_model("lenet300")
    assert model(torch.randn(2, 784)).shape == (2, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    big = get_model("lenet300", in_channels=3, image_size=32)
    assert big.fc1.in_features == 3 * 32 * 32
    with pytest.raises(ValueError, match="784"):
        model(torch.randn(2, 3, 32, 32))


def test_default_input_shape() -> None:
    assert default_input_shape("lenet5") == (1, 28, 28)
    assert default_input_shape("lenet300") == (1, 28, 28)
    assert default_input_shape("resnet20") == (3, 32, 32)
    model = get_model("resnet20")  # defaults follow the native shape
    assert model.conv1.in_channels == 3
    assert get_model("lenet5").conv1.in_channels == 1


def test_unknown_model_raises_listing_names() -> None:
    with pytest.raises(ValueError) as exc:
        get_model("resnet1000")
    msg = str(exc.value)
    assert "resnet1000" in msg
    for name in MODELS:
        assert name in msg
    with pytest.raises(ValueError):
        default_input_shape("nope")
