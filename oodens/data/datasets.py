"""The facts about each dataset oodens knows, in one table (:data:`DATASETS`).

Every other place that needs a class count, a save-folder name, a default preprocessing preset, a
training recipe family or where a benchmark's files live reads it from here:

- :mod:`oodens.modes.discovery` tells a mode's dataset from its path ``save/<folder>/<Arch>/<mode>`` and fills in
  the class count and preset a mode without a sidecar lacks;
- :mod:`oodens.train.loop` picks the recipe by ``family``, saves under ``folder`` and sizes the heads;
- :mod:`oodens.data.benchmarks` builds each benchmark's ID splits from ``data_dir`` and its OOD sets
  from ``ood_sets``.

Names are spelt many ways today (``digits`` / ``Digits``, ``cifar10`` / ``CIFAR10``, ``imagenet`` /
``ImageNet``); :func:`find_dataset` accepts the benchmark name or the folder name in any case.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OodSet:
    """An evaluation OOD set that lives under the data root."""

    name: str
    path: str  # relative to the data root
    reader: str  # "folder" (unlabelled image folder) or "svhn" (SVHN's .mat)
    kind: str = "far"  # "near" or "far" semantic shift


@dataclass(frozen=True)
class Dataset:
    """One dataset: what the benchmarks, the mode folders and the training recipes agree on."""

    name: str  # benchmark name (``--dataset``, ``--benchmark``, the sidecar's ``dataset``)
    folder: str  # save/<folder>/<Arch>/<mode>, the mode-ensemble paper's layout
    num_classes: int
    preset: str  # default preprocessing preset (a key of oodens.data.presets.PRESETS)
    family: str  # training recipe family (the second key of oodens.train.loop.RECIPES)
    data_dir: str | None = None  # the ID splits under the data root (None: embedded, no files)
    ood_sets: tuple[OodSet, ...] = ()  # evaluation OOD sets under the data root


_CIFAR_OOD = (
    OodSet("SVHN", "ood_data/svhn/test_32x32.mat", "svhn"),
    OodSet("LSUN", "ood_data/LSUN", "folder"),
    OodSet("LSUN_resize", "ood_data/LSUN_resize", "folder"),
    OodSet("iSUN", "ood_data/iSUN", "folder"),
    OodSet("Texture", "ood_data/dtd/images", "folder"),
    OodSet("places365", "ood_data/places365", "folder"),
)
_IMAGENET_OOD = (
    OodSet("iNaturalist", "ood_data/iNaturalist", "folder"),
    OodSet("SUN", "ood_data/SUN", "folder"),
    OodSet("Places", "ood_data/Places", "folder"),
    OodSet("Texture", "ood_data/dtd/images", "folder"),
)

#: benchmark name -> facts. The one table of dataset facts.
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        # embedded: its splits and OOD sets are built in memory (oodens.data.digits)
        Dataset("digits", "Digits", 6, "digits", "digits"),
        Dataset("cifar10", "CIFAR10", 10, "cifar", "cifar", "CIFAR10", _CIFAR_OOD),
        Dataset("cifar100", "CIFAR100", 100, "cifar", "cifar", "CIFAR100", _CIFAR_OOD),
        Dataset("imagenet", "ImageNet", 1000, "imagenet", "imagenet", "imagenet", _IMAGENET_OOD),
    )
}

_SPELLINGS = {s.lower(): d for d in DATASETS.values() for s in (d.name, d.folder)}


def find_dataset(name: str) -> Dataset | None:
    """The dataset a benchmark or folder name means (any case), or None."""
    return _SPELLINGS.get(str(name).lower())
