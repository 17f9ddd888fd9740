"""The architecture registry: canonical name -> factory, the folder names under save/<Dataset>/, and model-library
families (``torchvision:<model>``, ``timm:<model>``) resolved by prefix."""

from __future__ import annotations

from typing import Callable

from torch import nn

from oodens.errors import OodensError

#: canonical arch name -> factory(num_classes) -> nn.Module
ARCHS: dict[str, Callable[[int], nn.Module]] = {}
#: folder name used in save/<Dataset>/<Arch>/ -> canonical name (case-insensitive lookup)
ARCH_FOLDERS: dict[str, str] = {}
#: library prefix -> (check(model) -> canonical model name, factory(model, num_classes) -> nn.Module):
#: ``<prefix>:<model>`` names any model of that library
ARCH_FAMILIES: dict[str, tuple[Callable[[str], str], Callable[[str, int], nn.Module]]] = {}


def register_arch(name: str, folder: str):
    def deco(factory):
        ARCHS[name] = factory
        ARCH_FOLDERS[folder] = name
        return factory

    return deco


def register_arch_family(prefix: str, check: Callable[[str], str]):
    """``<prefix>:<model>`` architectures: ``check(model)`` returns the library's spelling of the model or raises
    :class:`OodensError`; the decorated ``factory(model, num_classes)`` builds it."""
    def deco(factory):
        ARCH_FAMILIES[prefix] = (check, factory)
        return factory

    return deco


def canonical_arch(name: str) -> str:
    """Map a user-given or folder arch name (``cnn``, ``CNN``, ``torchvision:resnet50``) to the registry key."""
    prefix, sep, model = str(name).partition(":")
    if sep and prefix.lower() in ARCH_FAMILIES:
        return f"{prefix.lower()}:{ARCH_FAMILIES[prefix.lower()][0](model)}"
    for key in ARCHS:
        if key.lower() == name.lower():
            return key
    for folder, key in ARCH_FOLDERS.items():
        if folder.lower() == name.lower():
            return key
    raise OodensError(f"unknown architecture {name!r}: expected one of {', '.join(ARCHS)}, or "
                      f"{' or '.join(f'{p}:<model>' for p in ARCH_FAMILIES)}")


def arch_folder(name: str) -> str:
    key = canonical_arch(name)
    if key not in ARCHS:  # a library model: its name, with the colon a folder name cannot hold everywhere
        return key.replace(":", "-")
    return next(f for f, k in ARCH_FOLDERS.items() if k == key)


def create_model(name: str, num_classes: int) -> nn.Module:
    key = canonical_arch(name)
    prefix, sep, model = key.partition(":")
    if sep and prefix in ARCH_FAMILIES:
        return ARCH_FAMILIES[prefix][1](model, num_classes)
    return ARCHS[key](num_classes)
