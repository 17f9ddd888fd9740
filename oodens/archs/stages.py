"""The oodens interface of a convolutional network, built from its parts, and the layers of the
multi-layer views.

A network names ``to_second_stage(x)`` (input -> second-to-last stage map),
``last_stage(map)`` (-> last stage map, including any final BN/ReLU), ``pool(map)``
(-> penultimate features) and ``classifier`` (the final ``nn.Linear``); the rest follows:
features = pool(last_stage(to_second_stage(x))) and RankFeat's two stages are the
second-to-last and last maps.

Every architecture also lists its ``feature_layers``: the stage (or block) outputs that the
multi-layer views (``layers``: global-average-pooled, ``gram``: Gram-matrix features; see
:mod:`oodens.views.kinds`) read, in forward order, as :class:`Layer` s. Extraction captures them
with forward hooks during the one forward pass that gives the logits and features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layer:
    """One layer of the multi-layer views: the output of submodule ``module`` (a dotted path), seen as a
    (B, C, ...) map. ``relu``: the network applies a functional ReLU to that output before using it (a
    final ``bn1`` + ReLU), so the map is relu(output). ``tokens``: the output is (B, N, D) tokens, seen
    as a D x N map (channels = embedding dimensions)."""

    module: str
    relu: bool = False
    tokens: bool = False

    def as_map(self, out: torch.Tensor) -> torch.Tensor:
        """The module's output as a (B, C, ...) map."""
        if self.tokens:
            out = out.transpose(1, 2)
        return F.relu(out) if self.relu else out


def stage_layers(*names: str, last_relu: bool = False) -> tuple[Layer, ...]:
    """Layers named by their modules; ``last_relu``: the last one is a BN followed by a functional ReLU."""
    return tuple(Layer(n, relu=last_relu and i == len(names) - 1) for i, n in enumerate(names))


class StagedNetwork:
    #: the stage outputs of the multi-layer views, in forward order
    feature_layers: tuple[Layer, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.last_stage(self.to_second_stage(x)))

    def rankfeat_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        second = self.to_second_stage(x)
        return second, self.last_stage(second)

    def logits_from_last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
