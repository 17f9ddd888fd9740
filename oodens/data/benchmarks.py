"""Benchmarks as data: an ID train split, an ID test split and named OOD sets, and for validation (hyperparameter
selection, detectors and strategies calibrated on ID data) an ID validation split and OOD validation sets.

A benchmark may name its own ID validation split (``val_factory``, e.g. OpenOOD's val image lists); otherwise
the ID validation split is a seeded, class-stratified hold-out of ID train
(:class:`oodens.data.sources.HoldOutSource`: 10%, at most 5,000 samples, seed 0) and detectors fit on the rest.
OOD validation sets (``val_ood_factories``) are never evaluated sets; the embedded digits benchmark has two.

Where each benchmark's sets live under a data root (the layout the mode-ensemble paper's code
expects) and its class count are facts of :data:`oodens.data.datasets.DATASETS`; sources are only
built when used, so naming a benchmark costs no I/O. OOD sets that are not on disk are skipped with
one warning; no OOD set at all is an error.

    DIR/CIFAR10, DIR/CIFAR100            torchvision python format
    DIR/ood_data/svhn/test_32x32.mat     SVHN
    DIR/ood_data/{LSUN,LSUN_resize,iSUN,places365}, DIR/ood_data/dtd/images
    DIR/imagenet/{train,val}             ImageFolder
    DIR/ood_data/{iNaturalist,SUN,Places}

OpenOOD v1.5's benchmarks (``openood-cifar10``, ``openood-cifar100``, ``openood-imagenet200``,
``openood-imagenet``) read an OpenOOD data folder instead: ``DIR/benchmark_imglist/<id>/*.txt`` image lists
("relative/path label" lines) with the images under ``DIR/images_classic`` / ``DIR/images_largescale``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from oodens.data import digits
from oodens.data.corruptions import CorruptedSource, parse_corruptions
from oodens.data.datasets import DATASETS, Dataset
from oodens.data.sources import ArraySource, CifarSource, DataSource, SvhnSource, image_folder, image_list
from oodens.errors import OodensError

Factory = Callable[[], DataSource]


@dataclass
class Benchmark:
    name: str
    num_classes: int
    train_factory: Factory = field(repr=False)
    test_factory: Factory = field(repr=False)
    #: OOD set name -> factory, for the sets present on disk
    ood_factories: dict[str, Factory] = field(repr=False)
    #: OOD set name -> expected location, for the sets the benchmark names but the disk lacks
    missing: dict[str, str] = field(default_factory=dict)
    #: "near" / "far" (semantic shift, as the benchmark classes them; "semantic" when unclassed) and
    #: "shift" (covariate shift: corrupted ID test copies, or labelled ID-class sets such as OpenOOD's cifar10c)
    kinds: dict[str, str] = field(default_factory=dict)
    #: the benchmark's own ID validation split (None: a hold-out of ID train, see :meth:`validation`)
    val_factory: Factory | None = field(default=None, repr=False)
    #: OOD validation set name -> factory: sets for choosing hyperparameters, never evaluated
    val_ood_factories: dict[str, Factory] = field(default_factory=dict, repr=False)
    _built: dict[str, DataSource] = field(default_factory=dict, repr=False)

    def _get(self, key: str, factory: Factory) -> DataSource:
        if key not in self._built:
            self._built[key] = factory()
        return self._built[key]

    @property
    def id_train(self) -> DataSource:
        return self._get("__train__", self.train_factory)

    @property
    def id_test(self) -> DataSource:
        return self._get("__test__", self.test_factory)

    @property
    def ood(self) -> dict[str, DataSource]:
        return {n: self._get(n, f) for n, f in self.ood_factories.items()}

    def validation(self) -> tuple[DataSource, DataSource]:
        """(the ID training split detectors fit on, the ID validation split) when validation is in use: the whole
        training split and the benchmark's own validation split, else the two parts of the hold-out."""
        from oodens.data.sources import HoldOutSource

        if self.val_factory is not None:
            return self.id_train, self._get("__val__", self.val_factory)
        return (self._get("__fit__", lambda: HoldOutSource(self.id_train, "fit")),
                self._get("__heldout__", lambda: HoldOutSource(self.id_train, "val")))

    @property
    def val_ood(self) -> dict[str, DataSource]:
        return {n: self._get(f"__val_ood__{n}", f) for n, f in self.val_ood_factories.items()}

    def select_val_ood(self, entries: list[tuple[str, Factory | None]]) -> None:
        """Keep the named OOD validation sets (``(name, None)``, any case) and add new ones (``(name, factory)``),
        in order; none given keeps them all. An evaluated OOD set is never a validation set."""
        if not entries:
            return
        by_lower = {n.lower(): n for n in self.val_ood_factories}
        chosen: dict[str, Factory] = {}
        for name, factory in entries:
            if name in self.ood_factories or name.lower() in {n.lower() for n in self.ood_factories}:
                raise OodensError(f"--val-ood {name}: {name!r} is an evaluated OOD set, and evaluated sets are never "
                                  f"read to choose: expected one of {', '.join(self.val_ood_factories) or 'none'} "
                                  "or NAME=PATH for another set")
            if factory is None:
                if name.lower() not in by_lower:
                    raise OodensError(f"unknown OOD validation set {name!r} for benchmark {self.name!r}: expected "
                                      f"one of {', '.join(self.val_ood_factories) or 'none'} or NAME=PATH")
                name = by_lower[name.lower()]
                factory = self.val_ood_factories[name]
            if name in chosen:
                raise OodensError(f"OOD validation set {name!r} is given twice: expected unique names")
            chosen[name] = factory
        self.val_ood_factories = chosen

    def add_ood(self, name: str, factory: Factory, kind: str = "semantic") -> None:
        if name in self.ood_factories:
            raise OodensError(f"OOD set {name!r} is defined twice: expected unique names")
        self.ood_factories[name] = factory
        self.missing.pop(name, None)
        self.kinds[name] = kind

    def add_corruptions(self, spec: str | None) -> None:
        """Corrupted copies of the ID test split as covariate-shift sets (``--corruptions``)."""
        for c, s in parse_corruptions(spec):
            self.add_ood(f"{self.name}-C/{c}-{s}", lambda c=c, s=s: CorruptedSource(self.id_test, c, s), kind="shift")

    def select_ood(self, names: list[str] | None) -> dict[str, DataSource]:
        """The OOD sets to evaluate: all present by default, else the named ones, in the given order."""
        if not names:
            if not self.ood_factories:
                where = "; ".join(f"{n}: {p}" for n, p in self.missing.items())
                raise OodensError(f"benchmark {self.name!r} has no OOD set on disk (expected {where})")
            return self.ood
        unknown = [n for n in names if n not in self.ood_factories]
        if unknown:
            known = list(self.ood_factories) + list(self.missing)
            missing = [n for n in unknown if n in self.missing]
            if missing:
                raise OodensError(f"OOD set {missing[0]!r} is not on disk: expected {self.missing[missing[0]]}")
            raise OodensError(
                f"unknown OOD set {', '.join(map(repr, unknown))} for benchmark {self.name!r}: "
                f"expected one of {', '.join(known)} (or NAME=PATH for another set)"
            )
        return {n: self._get(n, self.ood_factories[n]) for n in names}


def source_from_path(name: str, path: Path, imglist_root: Path | None = None) -> Factory:
    """``--ood NAME=PATH``: a folder of images, an OpenOOD image list (.txt) or an SVHN-style .mat."""
    path = Path(path).expanduser()
    if not path.exists():
        raise OodensError(f"--ood {name}={path}: no such file or folder (expected an image folder, an image list "
                          f".txt or a .mat file)")
    if path.is_dir():
        return lambda: image_folder(name, "test", path, labelled=False)
    if path.suffix == ".txt":
        return lambda: image_list(name, "test", path, imglist_root or path.parent)
    if path.suffix == ".mat":
        return lambda: SvhnSource(name, "test", path)
    raise OodensError(f"--ood {name}={path}: expected an image folder, an image list .txt or a .mat file")


# ------------------------------------------------------------------ the benchmarks


def _ood_sets(root: Path, facts: Dataset):
    """The dataset's OOD sets (:mod:`oodens.data.datasets`): factories for those on disk, and where the
    others were expected."""
    present, missing = {}, {}
    for s in facts.ood_sets:
        path = root / s.path
        if not path.exists():
            missing[s.name] = str(path)
        elif s.reader == "svhn":
            present[s.name] = lambda name=s.name, path=path: SvhnSource(name, "test", path)
        else:
            present[s.name] = lambda name=s.name, path=path: image_folder(name, "test", path, labelled=False)
    return present, missing, {s.name: s.kind for s in facts.ood_sets if s.name in present}


def _require(path: Path, what: str, layout: str) -> None:
    if not path.exists():
        raise OodensError(f"{what} not found at {path} (expected {layout}; set --data-root DIR or OODENS_DATA)")


def _cifar(facts: Dataset):
    n = facts.num_classes

    def make(root: Path | None) -> Benchmark:
        root = _need_root(root, facts.name)
        folder = root / facts.data_dir
        layout = f"{folder}/{'cifar-10-batches-py' if n == 10 else 'cifar-100-python'} in torchvision's python format"
        _require(folder, f"CIFAR-{n}", layout)

        def split(s):
            def build():
                try:
                    return CifarSource(facts.name, s, folder, n)
                except FileNotFoundError as e:
                    raise OodensError(f"CIFAR-{n} {s} split not found: {e} (expected {layout})") from None
            return build

        return Benchmark(facts.name, n, split("train"), split("test"), *_ood_sets(root, facts))
    return make


def _imagenet(root: Path | None) -> Benchmark:
    facts = DATASETS["imagenet"]
    root = _need_root(root, facts.name)
    base = root / facts.data_dir

    def split(s):
        def build():
            _require(base / s, f"ImageNet {s} split", f"{base / s}/<class>/<image> (ImageFolder)")
            return image_folder(facts.name, s if s == "train" else "test", base / s, labelled=True)
        return build

    _require(base / "val", "ImageNet val split", f"{base / 'val'}/<class>/<image> (ImageFolder)")
    return Benchmark(facts.name, facts.num_classes, split("train"), split("val"), *_ood_sets(root, facts))


def _digits(root: Path | None) -> Benchmark:
    """The embedded benchmark: arrays built from scikit-learn's bundled digits (no data root)."""
    facts = DATASETS["digits"]

    def source(name, split, build):
        return lambda: ArraySource(name, split, build)

    ood = {name: source(name, "test", build) for name, (build, _) in digits.OOD_SETS.items()}
    return Benchmark(facts.name, facts.num_classes, source(facts.name, "train", digits.id_train),
                     source(facts.name, "test", digits.id_test), ood,
                     kinds={name: kind for name, (_, kind) in digits.OOD_SETS.items()},
                     val_ood_factories={name: source(name, "val", build)
                                        for name, build in digits.VAL_OOD_SETS.items()})


def _openood(facts: Dataset):
    """An OpenOOD v1.5 benchmark from its image lists (:attr:`Dataset.image_lists`): the ID test list is required;
    the ID train and val lists are read when used (fitting; validation, as the benchmark's own ID validation split);
    near/far OOD sets (their kinds), covariate-shifted ID sets (kind ``shift``) and OOD validation sets that are
    not on disk are named in ``missing`` with their list file."""

    def make(root: Path | None) -> Benchmark:
        root = _need_root(root, facts.name)
        lists = {role: [x for x in facts.image_lists if x.role == role]
                 for role in ("train", "val", "test", "near", "far", "shift", "val-ood")}

        def source(x, split: str, labelled: bool, name: str | None = None):
            def build():
                where = root / x.file
                _require(where, f"{facts.name} {x.name} list", f"an OpenOOD v1.5 data folder: {x.file} "
                         f"(\"relative/path label\" lines) with the images under {root / x.images}")
                return image_list(name or x.name, split, where, root / x.images, labelled, x.geometry)
            return build

        (train,), (val,), (test,) = lists["train"], lists["val"], lists["test"]
        _require(root / test.file, f"{facts.name} ID test list", f"an OpenOOD v1.5 data folder: {test.file} with "
                 f"the images under {root / test.images}")
        present, missing, kinds, val_ood = {}, {}, {}, {}
        for role in ("near", "far", "shift", "val-ood"):
            for x in lists[role]:
                if not (root / x.file).is_file():
                    missing[x.name] = str(root / x.file)
                elif role == "val-ood":
                    val_ood[x.name] = source(x, "val", False)
                else:
                    present[x.name] = source(x, "test", role == "shift")
                    kinds[x.name] = role
        return Benchmark(facts.name, facts.num_classes, source(train, "train", True, facts.name),
                         source(test, "test", True, facts.name), present, missing, kinds,
                         val_factory=source(val, "val", True, facts.name), val_ood_factories=val_ood)
    return make


def _need_root(root: Path | None, bench: str) -> Path:
    if root is None:
        raise OodensError(f"benchmark {bench!r} needs a data root: pass --data-root DIR, set OODENS_DATA, "
                          f"or data_root in the config file")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise OodensError(f"data root {root} does not exist (expected a folder with the benchmark's datasets)")
    return root


#: benchmark name -> factory(data root). New benchmarks register here.
BENCHMARKS: dict[str, Callable[[Path | None], Benchmark]] = {
    "digits": _digits,
    "cifar10": _cifar(DATASETS["cifar10"]),
    "cifar100": _cifar(DATASETS["cifar100"]),
    "imagenet": _imagenet,
    **{name: _openood(facts) for name, facts in DATASETS.items() if facts.image_lists},
}


def data_root(flag: Path | None = None) -> Path | None:
    """``--data-root``, else ``$OODENS_DATA``, else ``data_root`` in the config file."""
    if flag is not None:
        return Path(flag)
    if os.environ.get("OODENS_DATA"):
        return Path(os.environ["OODENS_DATA"])
    from oodens.runtime.paths import config

    value = config().get("data_root")
    return Path(value) if value else None


def get_benchmark(name: str, root: Path | None = None) -> Benchmark:
    try:
        factory = BENCHMARKS[name.lower()]
    except KeyError:
        raise OodensError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}") from None
    return factory(root)
