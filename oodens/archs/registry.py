"""The architecture registry: canonical name -> factory, and the folder names under save/<Dataset>/."""

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
