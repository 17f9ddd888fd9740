"""The public API: what a notebook and every ``oodens`` command call.

    import oodens
    exp = oodens.Experiment(oodens.load_modes("save/CIFAR10/R18"),
                            oodens.get_benchmark("cifar10", data_root="/data", ood=["SVHN", "Texture"]))
    res = exp.evaluate(["msp", "energy", oodens.detectors.KNN(k=50)], ensemble_sizes="all")
    res.frame()          # tidy DataFrame, one row per record and metric
    res.table("fpr95")   # the papers' wide table
    res.save()           # into the results store that `oodens report` reads
    v = exp.views()      # v["seed-1000"].test.logits ... (extracted once, cached)

The flow: :func:`load_modes` (checkpoints -> modes), :func:`get_benchmark` (ID splits + OOD sets),
:class:`Experiment` (extraction -> views -> detectors -> ensemble -> metrics) and :class:`Results`
(records -> frame, tables, store). Errors are :class:`oodens.errors.OodensError` naming the culprit
and the parameter (``fit_fraction=2 ...``); the command line turns parameter names into its flags.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from oodens.data import Benchmark, DataSource
from oodens.data import get_benchmark as _registered_benchmark
from oodens.data import data_root as _resolve_root
from oodens.data import get_preset, source_from_path
from oodens.detectors import DETECTORS, Detector, get_detector
from oodens.ensemble.evaluate import DetectorRun, MemberSet, Quality, Sweep, evaluate_detector
from oodens.errors import OodensError, OodensWarning, ParameterError
from oodens.metrics.ood import POSITIVES
from oodens.modes.discovery import Mode, ModeFlags, discover_modes
from oodens.modes.heads import HeadBank, is_head_folder, load_heads
from oodens.runtime.paths import default_cache_dir, default_results_dir, safe_name, shipped_modes_dir
from oodens.views.cache import ViewCache
from oodens.views.types import Views


# --------------------------------------------------------------------------- modes


@dataclass
class ModeSet:
    """The modes (one checkpoint per seed) found in one folder: a sequence of :class:`oodens.modes.discovery.Mode`."""

    path: Path
    modes: list[Mode]
    #: a shared-backbone set (:mod:`oodens.modes.heads`): the heads, their backbone or precomputed features
    heads: "HeadBank | None" = None

    def __iter__(self):
        return iter(self.modes)

    def __len__(self) -> int:
        return len(self.modes)

    def __getitem__(self, key: int | str) -> Mode:
        if isinstance(key, str):
            for m in self.modes:
                if m.name == key:
                    return m
            raise KeyError(f"no mode {key!r} in {self.path}: expected one of {', '.join(self.names)}")
        return self.modes[key]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modes]

    @property
    def archs(self) -> list[str]:
        """The members' architectures, each once, in member order (several for a heterogeneous set)."""
        return list(dict.fromkeys(m.arch for m in self.modes))

    @property
    def mixed(self) -> bool:
        """Whether the members differ in architecture (tables then name each member's)."""
        return len(self.archs) > 1

    @property
    def arch(self) -> str:
        """The architecture, or for a mixed set its members' joined by ``+`` (``cnn+timm:vit_small_patch16_224``)."""
        return "+".join(self.archs)

    @property
    def dataset(self) -> str:
        return self.modes[0].dataset

    @property
    def num_classes(self) -> int:
        return self.modes[0].num_classes

    @property
    def shipped(self) -> bool:
        return self.path.resolve() == shipped_modes_dir().resolve()


def load_modes(path: str | Path | None = None, *, arch: str | None = None, num_classes: int | None = None,
               preset: str | None = None, dataset: str | None = None) -> ModeSet:
    """Every mode in a mode-set folder (default: the shipped digits modes). What each mode is comes from
    its ``oodens.json`` sidecar, else its path (``save/<Dataset>/<Arch>/<mode>``), else these arguments;
    an argument that contradicts the sidecar or path is an error. ``preset`` overrides the preprocessing."""
    if preset is not None:
        get_preset(preset)
    root = Path(path) if path is not None else shipped_modes_dir()
    if is_head_folder(root):  # N heads on one backbone (oodens train-heads): N members, one backbone pass
        bank = load_heads(root, ModeFlags(arch, num_classes, preset, dataset))
        return ModeSet(root, bank.members, bank)
    return ModeSet(root, discover_modes(root, ModeFlags(arch, num_classes, preset, dataset)))


# --------------------------------------------------------------------------- benchmarks


def get_benchmark(name: str, data_root: str | Path | None = None, *, ood: Sequence[str] | None = None,
                  imglist: Iterable[str | Path] = (), imglist_root: str | Path | None = None,
                  corruptions: str | None = None, val_ood: Sequence[str] | None = None) -> Benchmark:
    """A registered benchmark (``oodens.BENCHMARKS``) with the OOD sets to evaluate.

    ``ood``: names of the benchmark's OOD sets to use (case-insensitive; default every set on disk, with
    one :class:`OodensWarning` naming the sets that are missing) and/or ``NAME=PATH`` entries adding a set
    (an image folder, an OpenOOD image list ``.txt`` or a ``.mat``); ``imglist``: OpenOOD image lists
    added as sets named after their files; ``corruptions``: covariate-shift copies of the ID test split
    (``"all"`` or ``"NAME[:SEVERITY],..."``); ``val_ood``: the OOD validation sets for hyperparameter selection,
    names of the benchmark's (default: all of them; digits has ``letters-val`` and ``noise-val``) and/or
    ``NAME=PATH`` entries; an evaluated OOD set is never one. ``data_root`` defaults to ``$OODENS_DATA``, else
    the config file.
    """
    root = _resolve_root(Path(data_root) if data_root is not None else None)
    bench = _registered_benchmark(name, root)
    rel_root = Path(imglist_root) if imglist_root is not None else root
    by_lower = {n.lower(): n for n in [*bench.ood_factories, *bench.missing]}
    selected, added = [], []
    for entry in (str(e).strip() for e in (ood or []) if str(e).strip()):
        set_name, eq, path = entry.partition("=")
        if eq:
            bench.add_ood(set_name, source_from_path(set_name, Path(path), rel_root))
            added.append(set_name)
        else:
            selected.append(by_lower.get(set_name.lower(), set_name))
    for lst in imglist:
        stem = Path(lst).stem
        bench.add_ood(stem, source_from_path(stem, Path(lst), rel_root))
        added.append(stem)
    before = set(bench.ood_factories)
    bench.add_corruptions(corruptions)
    added += [n for n in bench.ood_factories if n not in before]
    if not selected and bench.missing:
        warnings.warn("OOD sets not on disk, skipped: " + "; ".join(f"{n} (expected {p})"
                                                                    for n, p in bench.missing.items()),
                      OodensWarning, stacklevel=2)
    chosen = list(bench.select_ood(selected + added if selected else None))
    bench.ood_factories = {n: bench.ood_factories[n] for n in chosen}
    val_entries = []
    for entry in (str(e).strip() for e in (val_ood or []) if str(e).strip()):
        set_name, eq, path = entry.partition("=")
        val_entries.append((set_name, source_from_path(set_name, Path(path), rel_root) if eq else None))
    bench.select_val_ood(val_entries)
    return bench


# --------------------------------------------------------------------------- views


@dataclass
class ModeViews:
    """One mode's views: ``train`` (None until a detector needs it), ``test`` and ``ood[set]``; with validation,
    ``val`` (the ID validation split; ``train`` is then what detectors fit on) and ``val_ood[set]``."""

    train: Views | None
    test: Views
    ood: dict[str, Views]
    val: Views | None = None
    val_ood: dict[str, Views] = field(default_factory=dict)


DetectorLike = Union[str, Detector, type]


def make_detector(spec: DetectorLike, benchmark: str | None = None, fit_fraction: float = 1.0) -> Detector:
    """A detector instance from a registry name or a class (default hyperparameters, with the paper defaults
    of ``benchmark`` where they differ: :mod:`oodens.detectors.defaults`), or an instance (as it is)."""
    from oodens.detectors.defaults import benchmark_defaults

    if isinstance(spec, Detector):
        return spec
    if isinstance(spec, str):
        spec = get_detector(spec)
    if isinstance(spec, type) and issubclass(spec, Detector):
        return spec(**benchmark_defaults(spec.name, benchmark, fit_fraction))
    raise OodensError(f"detector {spec!r}: expected a registry name (one of {', '.join(DETECTORS)}), a Detector "
                      "class or a Detector instance")


def detector_list(detectors: DetectorLike | Sequence[DetectorLike], benchmark: str | None = None,
                  fit_fraction: float = 1.0) -> list[Detector]:
    """``"msp"``, ``"msp,knn"``, ``"all"``, a detector, or a list of them -> validated instances, in order
    (names and classes with ``benchmark``'s paper defaults, see :func:`make_detector`)."""
    if isinstance(detectors, str):
        names = [s.strip() for s in detectors.split(",") if s.strip()]
        if not names:
            raise OodensError("no detector given: expected a detector name, a comma-separated list, or 'all'")
        detectors = list(DETECTORS) if names == ["all"] else list(dict.fromkeys(names))
    elif not isinstance(detectors, (list, tuple)):
        detectors = [detectors]
    out = [make_detector(d, benchmark, fit_fraction) for d in detectors]
    for d in out:
        d.validate()
    return out


def parse_ensemble_sizes(spec: int | str | Sequence[int] | None, n: int) -> list[int]:
    """``None``, ``k``, ``"a,b"``, ``[a, b]`` or ``"all"`` -> sorted sizes in 1..n."""
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, str) and spec.strip() == "all":
        return list(range(1, n + 1))
    try:
        sizes = [int(s) for s in spec.split(",") if s.strip()] if isinstance(spec, str) else \
            [int(spec)] if isinstance(spec, (int, np.integer)) else [int(s) for s in spec]
    except (TypeError, ValueError):
        raise ParameterError("experiment", "ensemble_sizes", spec, "is not k, a list of k, or 'all'") from None
    if not sizes or any(not 1 <= k <= n for k in sizes):
        raise ParameterError("experiment", "ensemble_sizes", spec, f"is out of range: expected sizes in 1..{n} "
                             "(the number of modes)")
    return sorted(set(sizes))


# --------------------------------------------------------------------------- the experiment


class Experiment:
    """A mode set on a benchmark: extracts each view once (cached) and scores detectors on them.

    ``modes``: a :class:`ModeSet`, a folder, or None for the shipped digits modes; ``benchmark``: a
    :class:`Benchmark` from :func:`get_benchmark`, a registered name, or None for the modes' dataset.
    ``cache_dir`` (default ``$OODENS_CACHE``, else ``$XDG_CACHE_HOME/oodens``) holds the views;
    ``fit_fraction`` fits detectors on a seeded fraction of the ID training split; the rest sets how the
    networks run (``precision`` is part of the cache key; ``channels_last`` and ``compile`` change speed only).
    ``class_masks``: OOD set -> the class indices it covers (a list, or a class-list file), for sets scored on a
    subset of the classes (default: ImageNet-A/R's packaged 200-class lists for sets of those names on a 1000-class
    benchmark, and what the benchmark declares in ``class_masks``): on such a set, argmax, accuracy and every score
    read the kept classes only (:func:`oodens.ensemble.evaluate.mask_views`).

    A shared-backbone mode set (``oodens train-heads``; :mod:`oodens.modes.heads`) extracts its backbone once per
    split (one pass per image whatever the number of heads); each head member's views (and the soup's, the heads'
    averaged weights, reported as its own row) are derived from the backbone's features.
    """

    def __init__(self, modes: ModeSet | str | Path | None = None, benchmark: Benchmark | str | None = None, *,
                 cache_dir: str | Path | None = None, device: str = "auto", fit_fraction: float = 1.0,
                 batch_size: int = 256, workers: int = 0, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, class_masks: dict[str, Sequence[int] | str | Path] | None = None,
                 modes_at_once: int | None = None, decode: str = "cpu"):
        if not 0 < fit_fraction <= 1:
            raise ParameterError("experiment", "fit_fraction", fit_fraction, "is not a fraction in (0, 1]")
        if batch_size < 1:
            raise ParameterError("experiment", "batch_size", batch_size, "is not a positive integer")
        self.modes = modes if isinstance(modes, ModeSet) else load_modes(modes)
        self.benchmark = benchmark if isinstance(benchmark, Benchmark) else \
            get_benchmark(benchmark or self.modes.dataset)
        if self.benchmark.num_classes != self.modes.num_classes:
            raise OodensError(f"modes in {self.modes.path} have {self.modes.num_classes} classes but benchmark "
                              f"{self.benchmark.name!r} has {self.benchmark.num_classes}: expected modes trained "
                              f"on {self.benchmark.name}")
        self.cache = ViewCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.fit_fraction = fit_fraction
        from oodens.data.classes import resolve_masks

        declared = {o: m for o, m in (getattr(self.benchmark, "class_masks", None) or {}).items() if o in self.oods}
        #: OOD set -> kept class indices (ImageNet-A/R: their 200 classes), see :func:`oodens.data.classes`
        self.masks = resolve_masks(self.oods, self.benchmark.num_classes, {**declared, **(class_masks or {})})
        from oodens.detectors.feature import set_bank_device

        set_bank_device(device)  # knn/nnguide banks where the networks run (float16 over the GPUs with CUDA)
        self.run_options = {"batch_size": batch_size, "device": device, "workers": workers, "precision": precision,
                            "channels_last": channels_last, "compile": compile,
                            "modes_at_once": modes_at_once,  # networks run per decoded batch (None: all)
                            "decode": decode}  # where image lists' JPEGs are decoded (oodens.views.decode)
        self._train: DataSource | None = None
        self._fit: DataSource | None = None

    # ---- data
    @property
    def oods(self) -> dict[str, DataSource]:
        return self.benchmark.ood

    @property
    def train_source(self) -> DataSource:
        """The ID training split detectors fit on (a seeded subsample with ``fit_fraction`` < 1); built on
        first use, so runs whose detectors fit nothing never list the training split."""
        if self._train is None:
            from oodens.data.sources import SubsetSource

            full = self.benchmark.id_train
            self._train = full if self.fit_fraction >= 1 else SubsetSource(full, self.fit_fraction)
        return self._train

    def fit_source(self, validation: bool = False) -> DataSource:
        """The ID training split detectors fit on: :attr:`train_source`, or with validation in use ID train
        minus the validation hold-out (the whole split when the benchmark names its own validation split),
        subsampled as :attr:`train_source` is with ``fit_fraction`` < 1."""
        if not validation:
            return self.train_source
        if self._fit is None:
            from oodens.data.sources import SubsetSource

            part = self.benchmark.validation()[0]
            self._fit = part if self.fit_fraction >= 1 else SubsetSource(part, self.fit_fraction)
        return self._fit

    @property
    def val_source(self) -> DataSource:
        """The ID validation split: the benchmark's own, else a seeded class-stratified hold-out of ID train
        (10%, at most 5,000 samples; :func:`oodens.data.sources.stratified_holdout`)."""
        return self.benchmark.validation()[1]

    @property
    def val_oods(self) -> dict[str, DataSource]:
        """The OOD validation sets (hyperparameter selection only; never evaluated)."""
        return self.benchmark.val_ood

    def sources(self, train: bool = True, validation: bool = False, val_ood: bool = False,
                fits: Sequence[bool] | None = None) -> list[DataSource]:
        """The splits to extract. ``fits``: the ID training splits detectors fit on (False: the whole
        :attr:`train_source`, True: it minus the validation hold-out); default ``[validation]`` if ``train``."""
        fits = list(dict.fromkeys(fits)) if fits is not None else ([validation] if train else [])
        return [*(self.fit_source(v) for v in fits), self.benchmark.id_test, *self.oods.values(),
                *([self.val_source] if validation else []), *(self.val_oods.values() if val_ood else [])]

    # ---- extraction -> views
    def extract(self, detectors: DetectorLike | Sequence[DetectorLike] = (), *, train: bool = True,
                validation: bool = False, val_ood: bool = False, distributed: bool = False,
                fits: Sequence[bool] | None = None):
        """Make sure every view these detectors read is cached (one forward pass per mode and split) and
        return the :class:`oodens.views.extract.Extraction`. ``validation``: also the ID validation split (and
        detectors then fit on ID train minus its hold-out), ``val_ood``: also the OOD validation sets; ``fits``:
        which training splits to extract (see :meth:`sources`; default the one ``validation`` implies).
        ``distributed``: under torchrun, ranks share each pass and rank 0 writes (the others get ``None``)."""
        from oodens.views.extract import extract as run_extract

        dets = self.detectors(detectors) if detectors else []
        specs = [s for d in dets for s in d.view_specs()]
        fits = list(dict.fromkeys(fits)) if fits is not None else ([validation] if train else [])
        sources = self.sources(train, validation, val_ood and validation, fits)
        kw = dict(specs=specs, base_only=[self.fit_source(v) for v in fits], **self.run_options)
        heads = self.modes.heads
        if heads is not None and heads.backbone is None:  # precomputed features: no network to run
            from oodens.modes.heads import FeatureExtraction

            return FeatureExtraction(heads.features)
        modes = heads.extraction_modes() if heads is not None else list(self.modes)  # heads: the backbone once
        if not distributed:
            return run_extract(modes, sources, self.cache, **kw)
        from oodens.runtime.distributed import process_group

        with process_group(self.run_options["device"]) as (ctx, dev):
            ex = run_extract(modes, sources, self.cache, **{**kw, "device": dev})
        return ex if ctx.is_main else None

    def views(self, detectors: DetectorLike | Sequence[DetectorLike] = (), *,
              validation: bool = False) -> dict[str, ModeViews]:
        """Each mode's views (memory-mapped from the cache, extracted on first use): logits, features,
        labels of the ID train and test splits and every OOD set, plus what ``detectors`` ask for;
        ``validation``: also the ID validation split and the OOD validation sets (``train`` is then ID train
        minus the validation hold-out, what detectors fit on when validating)."""
        ex = self.extract(detectors, validation=validation, val_ood=validation)
        sets = self.member_set(ex, True, validation, validation)
        return {m: ModeViews(sets.train[i], sets.test[i], {o: v[i] for o, v in sets.oods.items()},
                             sets.val[i] if validation else None, {o: v[i] for o, v in sets.val_oods.items()})
                for i, m in enumerate(sets.names)}

    def member_set(self, ex, train: bool, validation: bool = False, val_ood: bool = False,
                   held_out: bool | None = None) -> MemberSet:
        """The members' views (a head set's derived from its backbone's; its soup as ``MemberSet.soup``), the
        masked OOD sets' views restricted to their kept classes. ``train``: with the ID training split detectors
        fit on: the whole split, or (``held_out``, default ``validation``) it minus the validation hold-out."""
        from oodens.ensemble.evaluate import mask_views

        bank = self.modes.heads
        get = ex.get if bank is None else (lambda m, s: bank.views(m, ex.get(bank.key, s)))
        held_out = validation if held_out is None else held_out
        fit = self.fit_source(held_out) if train else None  # a run that fits nothing never lists ID train

        def views(names: list[str]) -> MemberSet:
            def ood(o, s):
                return [mask_views(get(m, s), self.masks[o], o) if o in self.masks else get(m, s) for m in names]

            return MemberSet(names, [get(m, fit) if train else None for m in names],
                             [get(m, self.benchmark.id_test) for m in names],
                             {o: ood(o, s) for o, s in self.oods.items()},
                             {o: self.benchmark.kinds.get(o, "semantic") for o in self.oods},
                             [get(m, self.val_source) for m in names] if validation else None,
                             {o: [get(m, s) for m in names] for o, s in self.val_oods.items()} if val_ood else {},
                             masks=self.masks)

        sets = views(self.modes.names)
        if bank is not None:
            sets.soup = views(["soup"])
        return sets

    # ---- detectors -> ensemble -> metrics
    def detectors(self, detectors: DetectorLike | Sequence[DetectorLike]) -> list[Detector]:
        """Instances of ``detectors``: names and classes with this benchmark's paper defaults (ODIN ε = 0, DICE
        p = 70 and knn k = 1000 × fit fraction on ImageNet; :mod:`oodens.detectors.defaults`), instances as given."""
        return detector_list(detectors, self.benchmark.name, self.fit_fraction)

    def applicable(self, detectors: list[Detector], strict: bool) -> list[Detector]:
        """The detectors that apply to these modes; one that does not is an error when ``strict``, else
        skipped with an :class:`OodensWarning` (how ``"all"`` behaves)."""
        members = [{**m.sidecar, "name": m.name} for m in self.modes]
        keep = []
        for d in detectors:
            why = d.applies_to(members) or self._heads_refuse(d)
            if why is None:
                keep.append(d)
            elif strict:
                raise OodensError(why)
            else:
                warnings.warn(f"skipping {d.name}: {why}", OodensWarning, stacklevel=3)
        return keep

    def _heads_refuse(self, d: Detector) -> str | None:
        """Why a detector cannot score a shared-backbone set, or None: head members share one network, so a view
        that needs a member's own network end to end (odin's and rankfeat's logits) cannot be derived per head,
        and precomputed features have no network at all."""
        bank = self.modes.heads
        if bank is None:
            return None
        shared = ("layers", "gram") if bank.backbone is not None else ()  # the backbone's maps: the same per head
        bad = [s.id for s in d.view_specs() if s.kind not in shared]
        if not bad:
            return None
        what = "a backbone's views" if bank.backbone is None else "each member's own network"
        return (f"{d.name} reads the {bad[0]} view, which needs {what}, but the members of {self.modes.path} are "
                f"heads on {'precomputed features' if bank.backbone is None else 'one shared backbone'}: expected a "
                "detector on logits/features (odin with eps 0, knn, energy, ...)")

    def evaluate(self, detectors: DetectorLike | Sequence[DetectorLike] = "msp", *, strategy: str | None = None,
                 positive: str = "id", ensemble_sizes: int | str | Sequence[int] | None = None,
                 max_subsets: int = 100, subset_seed: int = 0, skip_inapplicable: bool | None = None,
                 select: str | None = None, grid: dict[str, dict[str, Sequence]] | None = None) -> "Results":
        """Score each detector per mode and as a mode ensemble on every OOD set; returns :class:`Results`.

        ``detectors``: names, ``"all"`` (every detector that applies; others skipped with a warning),
        classes or instances (their hyperparameters). ``strategy``: the ensemble strategy (default each
        detector's own; with several detectors it applies where it fits; ``"all"``: every strategy each
        detector supports, one run each). ``positive``: ``"id"`` (the papers') or ``"ood"`` (OpenOOD's FPR95).
        ``ensemble_sizes``: also score every k-of-N subset of the modes (k, a list, or ``"all"``), at most
        ``max_subsets`` per k (a seeded sample). ``skip_inapplicable``: skip (with a warning) detectors that
        do not apply to these modes, or cannot be fitted or scored on them, instead of raising (default: only
        for ``"all"``).

        ``select`` (``"auroc"`` or ``"fpr95"``) with ``grid`` (``{"knn": {"k": [10, 50]}}``): each member, the
        ensemble and every subset takes the grid values whose metric on the ID validation split against the
        OOD validation sets is best; the ID test split and the evaluated OOD sets are never read to choose.
        Validation is in use with ``select``, a detector that fits on it or a strategy that standardises on
        it: detectors then fit on ID train minus the validation hold-out, and the settings say so."""
        from oodens.ensemble.evaluate import Candidate
        from oodens.ensemble.strategies import STRATEGIES, check_members, resolve_strategy, strategies_for

        if positive not in POSITIVES:
            raise ParameterError("experiment", "positive", positive, f"is not one of {', '.join(POSITIVES)}")
        if max_subsets < 1:
            raise ParameterError("experiment", "max_subsets", max_subsets, "is not a positive integer")
        if strategy is not None and strategy != "all" and strategy not in STRATEGIES:
            raise OodensError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)} or 'all'")
        if skip_inapplicable is None:
            skip_inapplicable = isinstance(detectors, str) and detectors.strip() == "all"
        strict = not skip_inapplicable
        dets = self.detectors(detectors)
        selections = self._selections(dets, select, grid)
        sweep = Sweep(parse_ensemble_sizes(ensemble_sizes, len(self.modes)), max_subsets, subset_seed)
        dets = self.applicable(dets, strict)
        leave_out, n = any(m.kept_classes for m in self.modes), len(self.modes)
        plan = []  # (detector, its strategies: None = its default)
        for d in dets:
            if strategy == "all":
                plan.append((d, strategies_for(type(d), n, leave_out)))
                continue
            if strategy is not None and strict:
                check_members(strategy, n)
                plan.append((d, [resolve_strategy(type(d), strategy, leave_out)]))
                continue
            applies = strategy is not None and strategy in strategies_for(type(d), n, leave_out)
            plan.append((d, [resolve_strategy(type(d), strategy if applies else None, leave_out)]))
        # Validation is decided per detector, so that adding tempscale or a zscore run never changes another
        # detector's numbers: one that selects, fits on the ID validation split or has a strategy standardised on
        # it fits on ID train minus the hold-out (every strategy of it alike); the others on the whole split.
        uses_val = [select is not None or type(d).reads("val") or any(STRATEGIES[s].needs_val for s in ss)
                    for d, ss in plan]
        validation = any(uses_val)
        if select is not None and not self.val_oods:
            raise OodensError(f"benchmark {self.benchmark.name!r} has no OOD validation set to select on: expected "
                              "--val-ood NAME=PATH (val_ood=['NAME=PATH'])")
        fits = [v for (d, _), v in zip(plan, uses_val) if type(d).reads("train")]
        for (d, _), v in zip(plan, uses_val):  # before any extraction: the training split's size is known
            if type(d).reads("train"):
                d.validate_training_size(len(self.fit_source(v)))
        ex = self.extract(dets, train=bool(fits), validation=validation, val_ood=select is not None, fits=fits)
        sets_by_fit = {v: self.member_set(ex, v in fits, validation, select is not None, held_out=v)
                       for v in dict.fromkeys([*uses_val, validation])}
        quality = Quality(sets_by_fit[validation])  # once per mode set, shared by every detector's records
        runs = []
        for (d, strategies), v in zip(plan, uses_val):
            sets = sets_by_fit[v]
            base = {**self.settings(), **(self.validation_settings(type(d).reads("train"), select) if v else {})}
            chosen = selections.get(d.name)
            candidates = [Candidate(p, sets) for p in (chosen.points(d) if chosen else [d])]  # shared by strategies
            for strat in strategies:
                try:
                    run = evaluate_detector(d, sets, strat, positive, sweep, quality, chosen, candidates)
                except OodensError as e:  # "all": a detector that cannot fit these modes (openmax without a
                    # correctly classified sample of a class) or a strategy undefined on these scores is skipped
                    if strategy != "all" and strict:
                        raise
                    warnings.warn(f"skipping {d.name} · {strat}: {e}", OodensWarning, stacklevel=2)
                    continue
                settings = {**base, "detector": d.name, "strategy": run.strategy, "params": run.params,
                            "positive": positive, "ood_sets": list(self.oods), "ensemble_sizes": sweep.sizes,
                            "max_subsets": max_subsets, "subset_seed": subset_seed, "leave_out": sets.leave_out}
                runs.append(Run(settings, [{"benchmark": self.benchmark.name, **r, **self._member_arch(r)}
                                           for r in run.records], run))
        return Results(runs, extraction={"computed": ex.computed, "cached": ex.cached, "cache": str(self.cache.root)})

    def _member_arch(self, record: dict) -> dict:
        """A member's record of a mixed set carries its own ``arch`` (the run's is the set's, ``a+b``): the tables
        name each member's architecture."""
        if not self.modes.mixed or record.get("role") != "member":
            return {}
        by_name = {m.name: m.arch for m in self.modes}
        return {"arch": by_name[record["member"]]} if record.get("member") in by_name else {}

    def _selections(self, dets: list[Detector], select: str | None, grid: dict | None) -> dict:
        """detector name -> :class:`Selection` (every detector when ``select``), checked before any work."""
        from oodens.ensemble.evaluate import Selection

        grid = dict(grid or {})
        if grid and select is None:
            d, params = next(iter(grid.items()))
            raise OodensError(f"a grid of hyperparameters ({d}: {', '.join(map(str, params))}) needs select='auroc' "
                              "or 'fpr95' (--select) to choose among its values on validation data")
        names = [d.name for d in dets]
        unknown = [g for g in grid if g not in names]
        if unknown:
            raise OodensError(f"grid for detector {unknown[0]!r}, which is not evaluated: expected one of "
                              f"{', '.join(names)}")
        if select is None:
            return {}
        out = {}
        for d in dets:
            out[d.name] = Selection(select, {p: list(v) for p, v in (grid.get(d.name) or {}).items()})
            out[d.name].points(d)  # every grid value checked before any extraction
        return out

    def validation_settings(self, train: bool, select: str | None) -> dict:
        """What was fitted on and what validated, for the settings of a run with validation in use."""
        def described(src: DataSource) -> dict:
            ident = src.identity()
            return {"name": src.name, "split": src.split, "n": len(src),
                    **{k: ident[k] for k in ("holdout", "fraction", "seed") if k in ident}}

        out = {"fit_on": described(self.fit_source(True)) if train else None, "id_val": described(self.val_source)}
        if select is not None:
            out.update({"ood_val": {n: len(s) for n, s in self.val_oods.items()}, "select": select})
        return {"validation": out}

    def settings(self) -> dict:
        """What identifies this experiment in the results store (the decoder only where image lists are decoded
        on the GPU: other pixels, other numbers)."""
        out = {"benchmark": self.benchmark.name, "modes": str(self.modes.path.resolve()), "arch": self.modes.arch,
               "checkpoints": {m.name: m.sha256 for m in self.modes}, "preset": self.modes[0].preset,
               "fit_fraction": self.fit_fraction, "precision": self.run_options["precision"]}
        if self.run_options["decode"] != "cpu":
            from oodens.runtime.device import resolve_device
            from oodens.views.decode import decodes_on_gpu, resolve_decode

            decode = resolve_decode(self.run_options["decode"], resolve_device(self.run_options["device"]))
            if any(decodes_on_gpu(s, decode) for s in [self.benchmark.id_test, *self.oods.values()]):
                out["decoder"] = "nvjpeg"
        return out


# --------------------------------------------------------------------------- results


@dataclass
class Run:
    """One detector x strategy on one experiment: its settings, records, and the per-sample scores."""

    settings: dict
    records: list[dict]
    detector_run: DetectorRun = field(repr=False)

    @property
    def scores(self) -> dict[str, dict[str, np.ndarray]]:
        return self.detector_run.scores


@dataclass
class Results:
    """What :meth:`Experiment.evaluate` returns: one :class:`Run` per detector."""

    runs: list[Run]
    extraction: dict = field(default_factory=dict)

    @property
    def records(self) -> list[dict]:
        """Every record (flat dicts, values as fractions), as ``oodens eval --json`` prints them."""
        return [r for run in self.runs for r in run.records]

    def frame(self, metrics: Sequence[str] | None = None):
        """Tidy DataFrame, one row per record and metric: benchmark, detector, strategy, member, role, k,
        stat, ood, kind, metric, value (and the settings that tell runs apart)."""
        from oodens.results import records_frame, tidy

        return tidy(records_frame(self._stored_records()), metrics)

    def wide(self):
        """One row per record, one column per metric."""
        from oodens.results import records_frame

        return records_frame(self._stored_records())

    def table(self, metric: str = "fpr95", oods: Sequence[str] | None = None):
        """The papers' wide table for one metric (rows detector x member, columns OOD sets): a
        :class:`oodens.report.tables.Table` (``.frame`` holds the cells; prints as Markdown, renders in notebooks)."""
        from oodens.report.tables import ood_tables

        tables = ood_tables(self.wide(), [metric], list(oods) if oods else None)
        if len(tables) != 1:
            raise OodensError(f"no {metric} table for these results")
        return tables[0]

    def save(self, results_dir: str | Path | None = None) -> list[Path]:
        """Store every run in the results store (default ``$OODENS_RESULTS``, else
        ``$XDG_DATA_HOME/oodens/results``), replacing an earlier run of the same settings."""
        from oodens.results import save_run

        root = Path(results_dir) if results_dir is not None else default_results_dir()
        return [save_run(root, run.settings, run.records) for run in self.runs]

    def save_scores(self, folder: str | Path) -> None:
        """Per-sample scores as ``folder/<detector>-<strategy>/<member>/<dataset>.npy`` (the ID test split
        under the benchmark's name), for ``oodens report --scores``."""
        for run in self.runs:
            bench = run.settings["benchmark"]
            for member, by_set in run.scores.items():
                out = Path(folder) / f"{run.settings['detector']}-{run.settings['strategy']}" / member
                out.mkdir(parents=True, exist_ok=True)
                for dataset, s in by_set.items():
                    name = bench if dataset == "id" else safe_name(dataset)
                    np.save(out / f"{name}.npy", np.asarray(s), allow_pickle=False)

    def _stored_records(self) -> list[dict]:
        return [{**run.settings, **r} for run in self.runs for r in run.records]
