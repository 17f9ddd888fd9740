"""``WRN28X10``: the Wide-ResNet-28-10 of the mode-ensemble paper's CIFAR code.

Pre-activation wide blocks with conv biases: ``bn1 - ReLU - conv1 (3x3) - dropout -
bn2 - ReLU - conv2 (3x3, carries the stride)`` plus the shortcut (``shortcut.0``, a
1x1 conv with bias, where the shape changes; identity otherwise). A 3x3 stem conv (16
channels, with bias), three stages of 4 blocks (160, 320, 640 channels; strides 1, 2,
2), the final ``bn1`` (momentum 0.9, as the reference) + ReLU, ``avg_pool2d(., 8)`` ->
640 (at 32x32 inputs), head ``linear``. Dropout 0.3 between the convs while training,
off in eval mode.

RankFeat stages: ``layer2``'s output (second to last) and ``relu(bn1(layer3(.)))``
(last). The last stage includes the final BN + ReLU, as the reference's
``intermediate_forward(x, 4)`` does, and ``logits_from_last_stage`` is then
``avg_pool2d 8 -> linear`` (the reference's ``forward_head``); so
``logits_from_last_stage(last_stage(second)) == forward(x)``.

Layers of the multi-layer views: ``layer1``, ``layer2`` and ``relu(bn1(layer3(.)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs.registry import register_arch
from oodens.archs.stages import StagedNetwork, stage_layers


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout_rate: float, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(StagedNetwork, nn.Module):
    feature_layers = stage_layers("layer1", "layer2", "bn1", last_relu=True)

    def __init__(self, depth: int, widen_factor: int, dropout_rate: float, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("Wide-ResNet depth must be 6n+4")
        n = (depth - 4) // 6
        stages = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, stride=1, padding=1, bias=True)
        planes_in = stages[0]
        for i, (planes, stride) in enumerate(zip(stages[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(planes_in, planes, dropout_rate, stride if j == 0 else 1))
                planes_in = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(planes_in, momentum=0.9)
        self.linear = nn.Linear(planes_in, num_classes)
        self.feature_dim = planes_in
        # the reference's conv_init: Xavier-uniform (gain sqrt 2) convs with zero bias, BN 1/0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=2**0.5)
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    @staticmethod
    def pool(a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.avg_pool2d(a, 8), 1)

    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.conv1(x)))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.layer3(a)))


@register_arch("WRN28X10", folder="WRN28X10")
def wrn28x10(num_classes: int) -> nn.Module:
    return WideResNet(28, 10, 0.3, num_classes)
