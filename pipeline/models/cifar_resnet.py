"""CIFAR ResNet of He et al. 2016 §4.2 (option-A shortcuts).

A faithful re-implementation of ``resnet.py`` in ``akamaster/pytorch_resnet_cifar10``
(BSD-2-Clause, Yerlan Idelbayev): 3x3 conv (16) - BN - ReLU, three stages of ``n``
`BasicBlock` s with 16, 32 and 64 channels (stride 2 at the first block of stages 2 and 3),
parameter-free "option A" shortcuts, global average pooling and a ``linear`` 64 -> C head.
Depth is ``6n + 2``. Attribute names follow that repository, so its checkpoints load once the
``module.`` prefix of ``nn.DataParallel`` is stripped (`pipeline.models.load_weights` does).

Two deliberate generalisations, both identical to the original at their defaults:

- ``width`` scales the three stages to ``(w, 2w, 4w)`` channels (16 gives the paper's net);
- pooling is a global mean over H and W (the original uses ``avg_pool2d`` with a square
  kernel of size W, the same thing for the square inputs it was trained on).

The model exposes the small interface `pipeline.models.ImageClassifier` expects:
``embed(x) -> (B, 4*width)``, ``classify(e) -> (B, C)``, ``embed_dim`` and ``num_classes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

# The builders a model file may name as "pipeline.models.cifar_resnet:<name>" (see
# `pipeline.models.factory.check_entrypoint`): only these are imported on a file's word.
MODEL_ENTRYPOINTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channel axis (no parameters)."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        pad = planes - in_planes
        self.pad_front = pad // 2
        self.pad_back = pad - pad // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back), "constant", 0.0)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def _init_weights(module: nn.Module) -> None:
    # As the reference repository: kaiming_normal_ (fan_in, leaky_relu a=0) on every conv and
    # linear weight; biases and BatchNorm keep PyTorch's defaults.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``blocks_per_stage`` basic blocks in each of 3 stages."""

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 16,
    ) -> None:
        super().__init__()
        for field, value, minimum in (
            ("blocks_per_stage", blocks_per_stage, 1),
            ("num_classes", num_classes, 1),
            ("in_chans", in_chans, 1),
            ("width", width, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"CifarResNet: {field}={value!r} must be an int >= {minimum}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.width = width
        self.embed_dim = 4 * width
        self.in_planes = width

        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(2 * width, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(4 * width, blocks_per_stage, stride=2)
        self.linear = nn.Linear(4 * width, num_classes)
        self.apply(_init_weights)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features: (B, in_chans, H, W) -> (B, embed_dim)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 4w, H/4, W/4)
        return out.mean(dim=(2, 3))  # (B, 4w)

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        """Logits from embeddings: (B, embed_dim) -> (B, num_classes)."""
        return self.linear(e)

    def get_classifier(self) -> nn.Module:
        """The classifier module (timm's name), used to find the head's keys in a checkpoint."""
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


def resnet8(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-8: 1 basic block per stage; embed_dim = 4 * width."""
    return CifarResNet(1, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet14(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-14: 2 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(2, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet20(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-20: 3 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(3, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet32(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-32: 5 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(5, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet44(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-44: 7 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(7, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet56(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-56: 9 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(9, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet110(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-110: 18 basic blocks per stage; embed_dim = 4 * width."""
    return CifarResNet(18, num_classes=num_classes, in_chans=in_chans, width=width)
