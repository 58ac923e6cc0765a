"""LeNet models used by the pruning literature (MNIST-sized inputs).

Both models are built only from ``nn.Linear``, ``nn.Conv2d``, pooling and ``nn.ReLU``
modules, each used exactly once per forward pass, so that prunable layers can be
swapped for masked versions by type.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet300100", "LeNet5"]


class LeNet300100(nn.Module):
    """Fully connected LeNet-300-100: ``in_features -> 300 -> 100 -> num_classes``.

    The input is flattened, whatever its shape (``[N, C, H, W]`` or ``[N, F]``); its
    number of features per sample must equal ``in_features``. With the defaults
    (784 inputs, 10 classes) the model has exactly 266,610 parameters.

    Args:
        in_features: Number of input features per sample (``C * H * W``).
        num_classes: Number of output logits.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"in_features and num_classes must be positive, got {in_features}, {num_classes}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for a batch ``x`` of any trailing shape."""
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"LeNet300100 expects {self.in_features} features per sample, got {x.shape[1]}"
            )
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant used by pruning papers (20 and 50 conv filters, 500 hidden units).

    ``conv 5x5 (20) -> ReLU -> maxpool 2 -> conv 5x5 (50) -> ReLU -> maxpool 2 ->
    fc 800-500 -> ReLU -> fc 500-num_classes``.

    For the canonical 28x28 input the second pooling yields ``50 x 4 x 4 = 800`` features.
    An adaptive average pooling to 4x4 follows it (an identity for 28x28 inputs), so any
    input of at least 16x16 pixels works and the parameter count never depends on the
    input size: 431,080 parameters for 1 input channel and 10 classes.

    Args:
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}"
            )
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.adapt = nn.AdaptiveAvgPool2d((4, 4))
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, C, H, W]``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(self.adapt(x), 1)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)
