"""ResNets: ``R18`` (CIFAR, 32x32 inputs) and ``R50`` (ImageNet, torchvision's structure).

``R18`` is the ResNet-18 of the mode-ensemble paper's CIFAR code: a 3x3 stem conv
(stride 1, no max-pool), four stages of two BasicBlocks (64, 128, 256, 512 channels;
stride 2 from the second stage on), a projection shortcut ``shortcut.0`` (1x1 conv) +
``shortcut.1`` (BN) where the shape changes, ``avg_pool2d(layer4, 4)`` -> 512 (at 32x32
inputs) and the head ``linear``.

``R50`` is torchvision's ``resnet50`` (same modules, same state-dict keys; the
``module.`` prefix of DataParallel checkpoints is stripped by the loader), head ``fc``,
features ``avgpool`` -> 2048. torchvision is imported only when an R50 is built.

OpenOOD v1.5's networks (``openood/networks/resnet18_32x32.py``, ``resnet18_224x224.py``):
``ResNet18_32x32`` is ``R18`` with the head named ``fc`` and adaptive average pooling;
``ResNet18_224x224`` is torchvision's ``resnet18`` (keys unchanged, head ``fc``, ``avgpool`` -> 512);
OpenOOD's ``ResNet50`` is torchvision's ``resnet50``, i.e. ``R50``.

RankFeat stages (both): the output of ``layer3`` (second to last) and of ``layer4``
(last); ``last_stage = layer4``; ``logits_from_last_stage`` = pool -> head. This is the
``intermediate_forward(x, 3/4)`` / ``layer4`` / ``forward_head`` of the reference code.

Layers of the multi-layer views (both): the outputs of ``layer1`` to ``layer4``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs.registry import register_arch
from oodens.archs.stages import StagedNetwork, stage_layers


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(StagedNetwork, nn.Module):
    """ResNet for 32x32 inputs (3x3 stem, no max-pool); ``linear`` head, ``avg_pool2d(4)``."""

    feature_layers = stage_layers("layer1", "layer2", "layer3", "layer4")
    head = "linear"

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes_in, planes, stride))
                planes_in = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = planes_in
        self.add_module(self.head, nn.Linear(planes_in, num_classes))

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self, self.head)

    @staticmethod
    def pool(a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.avg_pool2d(a, 4), 1)

    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.layer4(a)


@register_arch("R18", folder="R18")
def r18(num_classes: int) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes)


class OpenOODResNet18_32x32(CifarResNet):
    """OpenOOD v1.5's ``ResNet18_32x32``: the same stem, blocks and keys as ``R18``, head ``fc``, features by
    adaptive average pooling of ``layer4`` (equal to ``avg_pool2d(4)`` at 32x32)."""

    head = "fc"

    def __init__(self, num_classes: int):
        super().__init__((2, 2, 2, 2), num_classes)

    @staticmethod
    def pool(a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)


@register_arch("ResNet18_32x32", folder="resnet18_32x32")
def openood_resnet18_32x32(num_classes: int) -> nn.Module:
    return OpenOODResNet18_32x32(num_classes)


class _TorchvisionResNetInterface(StagedNetwork):
    """oodens' interface on top of ``torchvision.models.ResNet`` (keys unchanged)."""

    feature_layers = stage_layers("layer1", "layer2", "layer3", "layer4")

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(a), 1)

    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.layer4(a)


@functools.cache
def _torchvision_resnet_class(block: str, layers: tuple[int, ...], name: str) -> type:
    # torchvision takes about a second to import: only pay it when such a network is built
    from torchvision.models import resnet

    block_class = getattr(resnet, block)

    class ImageNetResNet(_TorchvisionResNetInterface, resnet.ResNet):
        feature_dim = 512 * block_class.expansion

        def __init__(self, num_classes: int):
            resnet.ResNet.__init__(self, block_class, list(layers), num_classes=num_classes)

    ImageNetResNet.__name__ = ImageNetResNet.__qualname__ = name
    ImageNetResNet.__module__ = __name__
    return ImageNetResNet


@register_arch("R50", folder="R50")
def r50(num_classes: int) -> nn.Module:
    return _torchvision_resnet_class("Bottleneck", (3, 4, 6, 3), "ImageNetResNet50")(num_classes)


@register_arch("ResNet18_224x224", folder="resnet18_224x224")
def openood_resnet18_224x224(num_classes: int) -> nn.Module:
    """OpenOOD v1.5's ``ResNet18_224x224``: torchvision's ``resnet18`` (same modules and keys), head ``fc``,
    features ``avgpool`` -> 512."""
    return _torchvision_resnet_class("BasicBlock", (2, 2, 2, 2), "OpenOODResNet18_224x224")(num_classes)
