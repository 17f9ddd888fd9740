"""DenseNets: ``DNBC100`` (DenseNet-BC-100 for CIFAR, DICE's model) and ``DN121``
(ImageNet, torchvision's structure).

``DNBC100`` (growth 12, bottleneck, compression 0.5, no dropout): a 3x3 stem conv
(24 channels), three dense blocks of 16 bottleneck layers (``bn1 - ReLU - conv1 1x1
(48) - bn2 - ReLU - conv2 3x3 (12)``, output concatenated to the input) under
``blockN.layer.<i>``, transitions ``transN`` (``bn1 - ReLU - conv1 1x1`` to half the
channels, then 2x2 average pooling), the final ``bn1`` + ReLU, ``avg_pool2d(., 8)`` ->
342 (at 32x32 inputs), head ``fc``. Keys and shapes are those of DICE's
``checkpoint_100.pth.tar``.

``DN121`` is torchvision's ``densenet121`` (same modules and keys, head ``classifier``),
features ``relu(features(x))`` (``features`` ends with ``norm5``) -> adaptive average
pooling -> 1024. torchvision is imported only when a DN121 is built.

RankFeat stages, following the reference codes' ``intermediate_forward``:
- DNBC100: second = ``trans2(block2(.))``; last = ``relu(bn1(block3(second)))`` (DICE's
  ``intermediate_forward(x, 3)`` includes the final BN + ReLU); head = ``avg_pool2d 8 -> fc``.
- DN121: second = output of ``transition3``; last = ``norm5(denseblock4(second))`` (the
  mode-ensemble code's block-4 map: BN included, ReLU not); head = ``relu -> pool ->
  classifier`` (its ``forward_head``).

Layers of the multi-layer views (the end of each dense stage): DNBC100 ``trans1``, ``trans2``,
``relu(bn1(.))``; DN121 ``transition1`` to ``transition3`` and ``relu(norm5(.))``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs.registry import register_arch
from oodens.archs.stages import StagedNetwork, stage_layers


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth: int, drop_rate: float = 0.0):
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out
        out = self.conv2(F.relu(self.bn2(out)))
        out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out
        return F.avg_pool2d(out, 2)


class DenseBlock(nn.Module):
    def __init__(self, n_layers: int, in_planes: int, growth: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[Bottleneck(in_planes + i * growth, growth, drop_rate) for i in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DenseNetBC(StagedNetwork, nn.Module):
    """DenseNet-BC for 32x32 inputs (DICE's ``DenseNet3`` with ``bottleneck=True``)."""

    feature_layers = stage_layers("trans1", "trans2", "bn1", last_relu=True)

    def __init__(self, depth: int, num_classes: int, growth: int = 12, reduction: float = 0.5,
                 drop_rate: float = 0.0, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6  # bottleneck layers per block
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.block1 = DenseBlock(n, planes, growth, drop_rate)
        planes += n * growth
        self.trans1 = Transition(planes, int(math.floor(planes * reduction)), drop_rate)
        planes = int(math.floor(planes * reduction))
        self.block2 = DenseBlock(n, planes, growth, drop_rate)
        planes += n * growth
        self.trans2 = Transition(planes, int(math.floor(planes * reduction)), drop_rate)
        planes = int(math.floor(planes * reduction))
        self.block3 = DenseBlock(n, planes, growth, drop_rate)
        planes += n * growth
        self.bn1 = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        self.feature_dim = planes
        for m in self.modules():  # He init for convs, zero bias for the head (BN: 1/0 default)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    @staticmethod
    def pool(a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.avg_pool2d(a, 8), 1)

    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trans1(self.block1(self.conv1(x)))
        return self.trans2(self.block2(out))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.block3(a)))


@register_arch("DNBC100", folder="DNBC100")
def dnbc100(num_classes: int) -> nn.Module:
    return DenseNetBC(100, num_classes, growth=12, reduction=0.5)


class _TorchvisionDenseNetInterface(StagedNetwork):
    """oodens' interface on top of ``torchvision.models.DenseNet`` (keys unchanged;
    torchvision's own ``classifier`` attribute is the head)."""

    feature_layers = stage_layers("features.transition1", "features.transition2", "features.transition3",
                                  "features.norm5", last_relu=True)

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(a), 1), 1)

    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.features.named_children():
            x = module(x)
            if name == "transition3":
                return x
        raise RuntimeError("DenseNet has no transition3")

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.features.norm5(self.features.denseblock4(a))


@functools.cache
def _densenet121_class() -> type:
    # torchvision takes about a second to import: only pay it when a DN121 is built
    from torchvision.models.densenet import DenseNet

    class ImageNetDenseNet121(_TorchvisionDenseNetInterface, DenseNet):
        feature_dim = 1024

        def __init__(self, num_classes: int):
            DenseNet.__init__(self, 32, (6, 12, 24, 16), 64, num_classes=num_classes)

    ImageNetDenseNet121.__module__ = __name__
    return ImageNetDenseNet121


@register_arch("DN121", folder="DN121")
def dn121(num_classes: int) -> nn.Module:
    return _densenet121_class()(num_classes)
