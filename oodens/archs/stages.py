"""The oodens interface of a convolutional network, built from its parts.

A network names ``to_second_stage(x)`` (input -> second-to-last stage map),
``last_stage(map)`` (-> last stage map, including any final BN/ReLU), ``pool(map)``
(-> penultimate features) and ``classifier`` (the final ``nn.Linear``); the rest follows:
features = pool(last_stage(to_second_stage(x))) and RankFeat's two stages are the
second-to-last and last maps.
"""

from __future__ import annotations

import torch


class StagedNetwork:
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.last_stage(self.to_second_stage(x)))

    def rankfeat_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        second = self.to_second_stage(x)
        return second, self.last_stage(second)

    def logits_from_last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
