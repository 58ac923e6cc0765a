"""Model zoo of autoprune_ext: plain PyTorch networks, ready to have their layers masked.

Every network is built only from ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
pooling and ``nn.ReLU`` modules (``nn.Dropout`` only where explicitly requested), and
every module is used at most once per forward pass, so prunable layers can be swapped
for masked versions by type.

Use :func:`get_model` with one of the names in :data:`MODELS`::

    model = get_model("resnet20", num_classes=10, in_channels=3)

Convolutional networks end with adaptive pooling, so 1x28x28 (MNIST, digits) and
3x32x32 (CIFAR) inputs both work whatever the architecture's native input.
``lenet300`` is fully connected: its input size is ``in_channels * image_size**2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .densenet import DenseNetBC, densenet22
from .lenet import LeNet5, LeNet300100
from .resnet import CifarResNet, resnet20, resnet56
from .vgg import VGG, VGGLike, vgg16_bn, vgg_like
from .wrn import WideResNet, wrn16_8

__all__ = [
    "MODELS",
    "ModelSpec",
    "get_model",
    "default_input_shape",
    "model_names",
    "LeNet300100",
    "LeNet5",
    "VGG",
    "VGGLike",
    "CifarResNet",
    "WideResNet",
    "DenseNetBC",
    "vgg_like",
    "vgg16_bn",
    "resnet20",
    "resnet56",
    "wrn16_8",
    "densenet22",
]

#: A builder takes keyword arguments ``num_classes``, ``in_channels``, ``image_size``.
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: how to build a model and its native input shape ``(C, H, W)``."""

    builder: Builder
    input_shape: tuple[int, int, int]
    description: str


def _lenet300(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return LeNet300100(in_features=in_channels * image_size * image_size, num_classes=num_classes)


def _lenet5(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return LeNet5(in_channels=in_channels, num_classes=num_classes)


def _wrap(fn: Callable[..., nn.Module]) -> Builder:
    """Adapt a ``fn(*, in_channels, num_classes)`` constructor to the builder signature."""

    def build(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return fn(in_channels=in_channels, num_classes=num_classes)

    build.__name__ = getattr(fn, "__name__", "build")
    build.__doc__ = fn.__doc__
    return build


#: Registered models by name.
MODELS: dict[str, ModelSpec] = {
    "lenet300": ModelSpec(_lenet300, (1, 28, 28), "LeNet-300-100 (fully connected)"),
    "lenet5": ModelSpec(_lenet5, (1, 28, 28), "LeNet-5, Caffe variant (20-50 conv, 500 fc)"),
    "vgg_like": ModelSpec(_wrap(vgg_like), (3, 32, 32), "Zagoruyko's CIFAR VGG-like"),
    "vgg16_bn": ModelSpec(_wrap(vgg16_bn), (3, 32, 32), "VGG-16 with BN, linear classifier"),
    "resnet20": ModelSpec(_wrap(resnet20), (3, 32, 32), "CIFAR ResNet-20"),
    "resnet56": ModelSpec(_wrap(resnet56), (3, 32, 32), "CIFAR ResNet-56"),
    "wrn16_8": ModelSpec(_wrap(wrn16_8), (3, 32, 32), "Wide ResNet 16-8"),
    "densenet22": ModelSpec(_wrap(densenet22), (3, 32, 32), "DenseNet-BC-22, growth 12"),
}


def model_names() -> list[str]:
    """Return the registered model names, in registry order."""
    return list(MODELS)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(MODELS)}"
        ) from None


def default_input_shape(name: str) -> tuple[int, int, int]:
    """Return the native input shape ``(C, H, W)`` of model ``name``.

    Raises:
        ValueError: if ``name`` is not registered.
    """
    return _spec(name).input_shape


def get_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: Optional[int] = None,
    image_size: Optional[int] = None,
) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: One of :data:`MODELS` (``lenet300``, ``lenet5``, ``vgg_like``, ``vgg16_bn``,
            ``resnet20``, ``resnet56``, ``wrn16_8``, ``densenet22``).
        num_classes: Number of output logits.
        in_channels: Input image channels; defaults to the model's native value
            (1 for the LeNets, 3 otherwise).
        image_size: Input height/width; defaults to the native value (28 for the LeNets,
            32 otherwise). Only ``lenet300`` depends on it (its input layer has
            ``in_channels * image_size**2`` features); the conv nets accept any
            reasonable size.

    Raises:
        ValueError: if ``name`` is unknown or a size is not positive.
    """
    spec = _spec(name)
    c = spec.input_shape[0] if in_channels is None else int(in_channels)
    s = spec.input_shape[1] if image_size is None else int(image_size)
    if num_classes < 1 or c < 1 or s < 1:
        raise ValueError(
            f"num_classes, in_channels and image_size must be positive, got {num_classes}, {c}, {s}"
        )
    return spec.builder(num_classes=int(num_classes), in_channels=c, image_size=s)
