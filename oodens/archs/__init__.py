"""Architecture registry (one entry per architecture, one file per family).

Every architecture is an ``nn.Module`` with
- ``forward_features(x) -> h``: the penultimate features (after pooling), (N, D);
- ``classifier``: the final ``nn.Linear`` so that logits = classifier(h);
- ``forward(x) = classifier(forward_features(x))``.
Extraction calls the first two, so logits and features always agree. For RankFeat
an architecture also names its last two stages: ``rankfeat_stages(x) -> (second-to-last
stage map, last stage map)``, ``last_stage(map)`` and ``logits_from_last_stage(map)``.
Convolutional networks get all of these from ``stages.StagedNetwork`` by naming
``to_second_stage``, ``last_stage``, ``pool`` and ``classifier``. Every architecture lists
``feature_layers`` (``stages.Layer``: a submodule whose output is a stage map), the layers of the
multi-layer views (``layers``, ``gram``), captured by forward hooks in the same forward pass.

Besides the named architectures, ``torchvision:<model>`` and ``timm:<model>`` name any classifier of those
libraries (:mod:`oodens.archs.zoo`: features and head found generically; no stage maps).
"""

from __future__ import annotations

from oodens.archs.registry import (ARCH_FAMILIES, ARCH_FOLDERS, ARCHS, arch_folder, canonical_arch, create_model,
                                   register_arch, register_arch_family)
from oodens.archs import cnn, densenet, resnet, t2t_vit, wrn, zoo  # noqa: F401,I001  (registers)

__all__ = ["ARCHS", "ARCH_FAMILIES", "ARCH_FOLDERS", "arch_folder", "canonical_arch", "create_model",
           "register_arch", "register_arch_family"]
