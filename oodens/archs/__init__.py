"""Architecture registry (one entry per architecture, one file per family).

Every architecture is an ``nn.Module`` with
- ``forward_features(x) -> h``: the penultimate features (after pooling), (N, D);
- ``classifier``: the final ``nn.Linear`` so that logits = classifier(h);
- ``forward(x) = classifier(forward_features(x))``.
Extraction calls the first two, so logits and features always agree. For RankFeat
an architecture also names its last two stages: ``rankfeat_stages(x) -> (second-to-last
stage map, last stage map)``, ``last_stage(map)`` and ``logits_from_last_stage(map)``.
Convolutional networks get all of these from ``stages.StagedNetwork`` by naming
``to_second_stage``, ``last_stage``, ``pool`` and ``classifier``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from oodens.errors import OodensError

#: canonical arch name -> factory(num_classes) -> nn.Module
ARCHS: dict[str, Callable[[int], nn.Module]] = {}
#: folder name used in save/<Dataset>/<Arch>/ -> canonical name (case-insensitive lookup)
ARCH_FOLDERS: dict[str, str] = {}


def register_arch(name: str, folder: str):
    def deco(factory):
        ARCHS[name] = factory
        ARCH_FOLDERS[folder] = name
        return factory

    return deco


def canonical_arch(name: str) -> str:
    """Map a user-given or folder arch name (``cnn``, ``CNN``) to the registry key."""
    for key in ARCHS:
        if key.lower() == name.lower():
            return key
    for folder, key in ARCH_FOLDERS.items():
        if folder.lower() == name.lower():
            return key
    raise OodensError(f"unknown architecture {name!r}: expected one of {', '.join(ARCHS)}")


def arch_folder(name: str) -> str:
    key = canonical_arch(name)
    return next(f for f, k in ARCH_FOLDERS.items() if k == key)


def create_model(name: str, num_classes: int) -> nn.Module:
    return ARCHS[canonical_arch(name)](num_classes)


from oodens.archs import cnn, densenet, resnet, t2t_vit, wrn  # noqa: E402,F401  (registers)
