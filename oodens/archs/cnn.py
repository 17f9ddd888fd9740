"""``cnn``: the small convolutional network of the embedded digits benchmark.

Three stages on 8x8 single-channel inputs (8x8 -> 4x4 -> 2x2), global average
pooling to a 128-d penultimate feature, and a linear head. Trains in seconds on a CPU.
Layers of the multi-layer views: the three stage outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from oodens.archs.registry import register_arch
from oodens.archs.stages import StagedNetwork, stage_layers


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(StagedNetwork, nn.Module):
    feature_dim = 128
    feature_layers = stage_layers("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.layer1 = _block(in_channels, 32)
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), _block(32, 64))
        self.layer3 = nn.Sequential(nn.MaxPool2d(2), _block(64, self.feature_dim))
        self.fc = nn.Linear(self.feature_dim, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    @staticmethod
    def pool(a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1)

    # RankFeat's two stages: layer2 (64 x 4 x 4) and layer3 (128 x 2 x 2)
    def to_second_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.layer3(a)


@register_arch("cnn", folder="CNN")
def cnn(num_classes: int) -> nn.Module:
    return DigitsCNN(num_classes)
