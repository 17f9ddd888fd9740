"""The facts about each dataset oodens knows, in one table (:data:`DATASETS`).

Every other place that needs a class count, a save-folder name, a default preprocessing preset, a
training recipe family or where a benchmark's files live reads it from here:

- :mod:`oodens.modes.discovery` tells a mode's dataset from its path ``save/<folder>/<Arch>/<mode>`` and fills in
  the class count and preset a mode without a sidecar lacks;
- :mod:`oodens.train.loop` picks the recipe by ``family``, saves under ``folder`` and sizes the heads;
- :mod:`oodens.data.benchmarks` builds each benchmark's ID splits from ``data_dir`` and its OOD sets
  from ``ood_sets``, or every split and set of an OpenOOD v1.5 benchmark from ``image_lists``.

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
class ImageList:
    """One image list of an OpenOOD v1.5 data folder: ``DIR/<file>`` of "relative/path label" lines, the paths
    relative to ``DIR/<images>``.

    ``role``: ``train``, ``val``, ``test`` (the ID splits), ``near``, ``far`` (evaluated OOD sets), ``val-ood``
    (OOD validation: hyperparameter selection only, never evaluated) or ``shift`` (covariate-shifted ID: accuracy
    under shift). ``geometry=False``: the images are fed at their own size (OpenOOD's ImageNet-C: no resize/crop)."""

    name: str
    file: str
    images: str
    role: str
    geometry: bool = True


@dataclass(frozen=True)
class Dataset:
    """One dataset: what the benchmarks, the mode folders and the training recipes agree on."""

    name: str  # benchmark name (``--dataset``, ``--benchmark``, the sidecar's ``dataset``)
    folder: str  # save/<folder>/<Arch>/<mode>, the mode-ensemble paper's layout
    num_classes: int
    preset: str  # default preprocessing preset (a key of oodens.data.presets.PRESETS)
    family: str  # training recipe family (the second key of oodens.train.loop.RECIPES)
    data_dir: str | None = None  # the ID splits under the data root (None: embedded, or image lists)
    ood_sets: tuple[OodSet, ...] = ()  # evaluation OOD sets under the data root
    image_lists: tuple[ImageList, ...] = ()  # an OpenOOD benchmark: every split and set as an image list
    #: the dataset whose classes (in order) this one's labels are; a mode trained on either evaluates on both
    #: (OpenOOD's CIFAR and ImageNet-1K lists label the classes as torchvision's datasets do). None: its own.
    label_space: str | None = None

    @property
    def classes_of(self) -> str:
        return self.label_space or self.name


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

CLASSIC, LARGESCALE = "images_classic", "images_largescale"


def _openood(bench: str, images: str, near: tuple[str, ...], far: tuple[str, ...], val_ood: str,
             shift: tuple[tuple[str, str], ...], classic: tuple[str, ...] = ()) -> tuple[ImageList, ...]:
    """OpenOOD v1.5's image lists of one benchmark (``evaluation_api/datasets.py``, ``DATA_INFO``): ID
    ``{train,val,test}_<bench>.txt``, near/far ``test_<set>.txt``, OOD validation ``val_<set>.txt`` and the
    covariate-shifted ID sets ``(name, file stem)``, all under ``benchmark_imglist/<bench>/``; images under
    ``images``, except the sets in ``classic`` (ImageNet's textures live in images_classic)."""
    where = lambda n: CLASSIC if n in classic else images  # noqa: E731
    path = lambda stem: f"benchmark_imglist/{bench}/{stem}.txt"  # noqa: E731
    return (*(ImageList(bench, path(f"{split}_{bench}"), images, split) for split in ("train", "val", "test")),
            *(ImageList(n, path(f"test_{n}"), where(n), "near") for n in near),
            *(ImageList(n, path(f"test_{n}"), where(n), "far") for n in far),
            ImageList(f"val_{val_ood}", path(f"val_{val_ood}"), images, "val-ood"),
            *(ImageList(n, path(stem), images, "shift", geometry=n != "imagenet_c") for n, stem in shift))


_OPENOOD_CIFAR_FAR = ("mnist", "svhn", "texture", "places365")
_OPENOOD_IMAGENET = dict(near=("ssb_hard", "ninco"), far=("inaturalist", "textures", "openimage_o"),
                         val_ood="openimage_o", classic=("textures",))

#: benchmark name -> facts. The one table of dataset facts.
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        # embedded: its splits and OOD sets are built in memory (oodens.data.digits)
        Dataset("digits", "Digits", 6, "digits", "digits"),
        Dataset("cifar10", "CIFAR10", 10, "cifar", "cifar", "CIFAR10", _CIFAR_OOD),
        Dataset("cifar100", "CIFAR100", 100, "cifar", "cifar", "CIFAR100", _CIFAR_OOD),
        Dataset("imagenet", "ImageNet", 1000, "imagenet", "imagenet", "imagenet", _IMAGENET_OOD),
        # OpenOOD v1.5 (evaluation_api/datasets.py for the lists, evaluation_api/preprocessor.py for the presets)
        Dataset("openood-cifar10", "OpenOOD-CIFAR10", 10, "cifar", "openood", label_space="cifar10",
                image_lists=_openood("cifar10", CLASSIC, ("cifar100", "tin"), _OPENOOD_CIFAR_FAR, "tin",
                                     (("cifar10c", "test_cifar10c"),))),
        Dataset("openood-cifar100", "OpenOOD-CIFAR100", 100, "openood-cifar100", "openood", label_space="cifar100",
                image_lists=_openood("cifar100", CLASSIC, ("cifar10", "tin"), _OPENOOD_CIFAR_FAR, "tin", ())),
        Dataset("openood-imagenet200", "OpenOOD-ImageNet200", 200, "imagenet", "openood",
                image_lists=_openood("imagenet200", LARGESCALE, shift=tuple(
                    (f"imagenet_{v}", f"test_imagenet200_{v}") for v in ("v2", "c", "r")), **_OPENOOD_IMAGENET)),
        Dataset("openood-imagenet", "OpenOOD-ImageNet", 1000, "imagenet", "openood", label_space="imagenet",
                image_lists=_openood("imagenet", LARGESCALE, shift=tuple(
                    (f"imagenet_{v}", f"test_imagenet_{v}") for v in ("v2", "c", "r", "es")), **_OPENOOD_IMAGENET)),
    )
}

_SPELLINGS = {s.lower(): d for d in DATASETS.values() for s in (d.name, d.folder)}


def find_dataset(name: str) -> Dataset | None:
    """The dataset a benchmark or folder name means (any case), or None."""
    return _SPELLINGS.get(str(name).lower())
