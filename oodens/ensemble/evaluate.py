"""Scoring a detector on a mode set: score members -> score the ensemble -> sweep subsets -> records.

The input is a :class:`MemberSet` (each member's views of the ID train split, the ID test split and
every OOD set). ID quality (accuracy, NLL, Brier, ECE of each member and of the ensemble, and the
accuracy on covariate-shift sets) does not depend on the detector: :class:`Quality` computes it once
per mode set and every detector's records carry it.

Records are flat dicts, one per (detector x strategy, row, OOD set), metric values as fractions.
The row is said by explicit fields:

- ``role``: ``"member"`` (one mode; ``member`` is its name, ``k`` = 1), ``"mean"`` / ``"std"`` (over
  the members, sample std), ``"ensemble"`` (all N members combined with the strategy, ``k`` = N) or
  ``"subsets"`` (the ensemble-size sweep: ``stat`` = ``"mean"`` or ``"std"`` over the k-of-N subsets,
  ``n_subsets`` of them);
- ``member``: the mode name, or the role's name (``mean``, ``std``, ``ensemble``, ``subsets``);
- ``ood``: an OOD set, ``"average"`` (mean over the semantic sets, taken per row before mean/std; only
  when there are several), ``"near"`` / ``"far"`` (when the benchmark names both), ``"C-<s>"`` (mean over
  the covariate-shift sets of severity s); ``kind`` says which (near, far, semantic, shift, average,
  shift-average).

Validation (``MemberSet.val``: each member's ID validation split; ``val_oods``: the OOD validation sets) is
read only by detectors that fit on it, strategies that standardise on it and hyperparameter selection
(:class:`Selection`): each grid point of the hyperparameters is one :class:`Candidate`; each member, the
ensemble and every subset of the sweep takes the grid point whose metric (ID validation split against the OOD
validation sets, mean over them) is best, and is then scored with it on the ID test split and the evaluated OOD
sets, which are never read to choose. Records then carry ``selected`` (the chosen values and their validation
metric) and ``params`` holds the grid.

Every row also carries ``id_accuracy`` (argmax of the averaged logits for an ensemble), ``id_nll``,
``id_brier``, ``id_ece`` (15 bins; an ensemble's predictive distribution is the mean of its members'
softmax). Leave-out members (ELOC; ``Views.classes`` set) are judged on the test samples of their kept
classes, and their ensemble's distribution spreads each member's softmax over all classes (0 where it
left classes out) before averaging; its accuracy is that mean's argmax. Rows of covariate-shift sets
also carry ``ood_accuracy``, the accuracy on the corrupted images.

Shared-backbone sets (SED's heads) add one row per OOD set: ``role`` ``"soup"`` (``member`` ``"soup"``, ``k`` = 1),
the heads' averaged weights scored as one more member (``MemberSet.soup``); it is not part of the mean, std or
ensemble. Ensemble-only detectors have no soup row.

Class masks (``MemberSet.masks``: OOD set -> kept class indices; ImageNet-A/R's 200 classes): the set's views are
restricted to the kept classes (:func:`mask_views`: logits columns, W and b rows, labels as positions in the kept
list), so argmax, accuracy and every score read those classes only; its OOD metrics compare against the ID test
split restricted the same way (scores under the key ``ID_KEY@<set>``).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from oodens.detectors import Detector
from oodens.errors import OodensError
from oodens.ensemble.strategies import STRATEGIES, check_members, ensemble_scores, resolve_strategy
from oodens.errors import ParameterError
from oodens.metrics import calibration as cal
from oodens.metrics.ood import METRICS, accuracy, ood_metrics
from oodens.views.types import Views

AVERAGE = "average"
ID_KEY = "__id__"
#: the key of the ID validation split, and the prefix of the OOD validation sets' keys
VAL_KEY = "__val__"
VAL_OOD = "__val_ood__:"
#: the metrics hyperparameters can be selected by
SELECT_METRICS = ("auroc", "fpr95")


@dataclass
class MemberSet:
    """The views one evaluation reads, member by member (lists in member order).

    ``train`` may hold ``None`` when no detector fits; ``kinds`` maps each OOD set to near, far,
    semantic or shift (semantic when not given); ``val`` (each member's ID validation split) and
    ``val_oods`` (OOD validation sets) are there only when validation is in use."""

    names: list[str]
    train: list[Views | None]
    test: list[Views]
    oods: dict[str, list[Views]]
    kinds: dict[str, str] = field(default_factory=dict)
    val: list[Views] | None = None
    val_oods: dict[str, list[Views]] = field(default_factory=dict)
    #: OOD set -> kept class indices; those sets' views are already restricted (see :func:`mask_views`)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    #: the soup of a shared-backbone set (one member named "soup"), scored as its own row; None elsewhere
    soup: "MemberSet | None" = None

    def __post_init__(self):
        self.kinds = {o: self.kinds.get(o, "semantic") for o in self.oods}
        self.masks = {o: m for o, m in self.masks.items() if o in self.oods}
        self._masked_id: dict[str, list[Views]] = {}

    @property
    def id_keys(self) -> list[str]:
        """The keys of the ID test split restricted to each masked set's classes (:func:`masked_id_key`)."""
        return [masked_id_key(o) for o in self.masks]

    def id_key(self, ood: str) -> str:
        """The ID scores an OOD set's metrics compare against: ``ID_KEY``, or the masked ID key of a masked set."""
        return masked_id_key(ood) if ood in self.masks else ID_KEY

    @property
    def leave_out(self) -> bool:
        return any(v.classes is not None for v in self.test)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.test[0].labels)

    @property
    def val_keys(self) -> list[str]:
        """The keys of the OOD validation sets (for :meth:`views`)."""
        return [VAL_OOD + o for o in self.val_oods]

    def views(self, key: str) -> list[Views]:
        """Each member's views of the set ``key``: ``ID_KEY`` (ID test), ``VAL_KEY`` (ID validation), an OOD
        validation key (:attr:`val_keys`) or an evaluated OOD set's name."""
        if key == ID_KEY:
            return self.test
        if key.startswith(ID_KEY + "@"):
            o = key[len(ID_KEY) + 1:]
            if o not in self._masked_id:
                self._masked_id[o] = [mask_views(v, self.masks[o], f"the ID test split on {o}'s classes",
                                                 labels_are_positions=False) for v in self.test]
            return self._masked_id[o]
        if key == VAL_KEY:
            if self.val is None:
                raise OodensError("these members have no ID validation views: expected validation in use "
                                  "(a detector or strategy that needs it, or selection)")
            return self.val
        if key.startswith(VAL_OOD):
            return self.val_oods[key[len(VAL_OOD):]]
        return self.oods[key]


def masked_id_key(ood: str) -> str:
    return f"{ID_KEY}@{ood}"


def mask_views(v: Views, kept, name: str = "a masked set", labels_are_positions: bool = True) -> Views:
    """``v`` restricted to the classes ``kept`` (class indices, in the set's label order): logits ``z[:, kept]``,
    weight ``W[kept]``, bias ``b[kept]``, the logits of extra logits views (odin, rankfeat) likewise; features as
    they are. Labels: with ``labels_are_positions`` (an OOD-generalization set such as ImageNet-R, whose labels are
    positions in its kept list, as an ImageFolder over its class folders numbers them) kept as they are, checked in
    ``0..len(kept)-1``; without (the ID test split, labelled with the dataset's classes) mapped to positions in
    ``kept``, -1 for a class outside it (counted wrong by accuracy).

    The result carries ``kept`` as :attr:`Views.kept` (the full head's index of each remaining column; masking
    views that are already masked composes the two), which detectors with per-class fitted state (tempscale, klm,
    openmax, she, nnguide, relation, gram, vim, dice, react-dice) read to restrict that state to the kept classes."""
    kept = np.asarray(kept, dtype=np.int64)
    if v.classes is not None:
        raise OodensError(f"class mask of {name}: leave-out members (kept_classes) cannot be masked: expected "
                          "ordinary members")
    z = np.asarray(v.logits)
    if z.ndim != 2 or kept.max() >= z.shape[1]:
        raise OodensError(f"class mask of {name}: class {int(kept.max())} is not among the {z.shape[-1]} logits: "
                          "expected indices of the ID classes")
    labels = v.labels
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels_are_positions:
            bad = labels[(labels < 0) | (labels >= len(kept))]
            if len(bad):
                raise OodensError(f"labels of {name} include {int(bad[0])}, outside its {len(kept)} kept classes: "
                                  f"expected labels 0..{len(kept) - 1}, positions in its class list")
        else:
            table = np.full(z.shape[1], -1, dtype=np.int64)
            table[kept] = np.arange(len(kept))
            labels = np.where((labels >= 0) & (labels < z.shape[1]), table[np.clip(labels, 0, z.shape[1] - 1)], -1)
    width = z.shape[1]
    extra = {k: (np.asarray(a)[:, kept] if not isinstance(a, dict) and np.ndim(a) == 2 and np.shape(a)[1] == width
                 else a) for k, a in v.extra.items()}
    full = kept if v.kept is None else np.asarray(v.kept, dtype=np.int64)[kept]
    return Views(logits=z[:, kept], features=v.features, labels=labels,
                 weight=None if v.weight is None else np.asarray(v.weight)[kept],
                 bias=None if v.bias is None else np.asarray(v.bias)[kept], extra=extra, kept=full)


@dataclass
class Sweep:
    """The ensemble-size sweep: for each k in ``sizes``, every k-of-N subset (or a seeded sample of
    ``max_subsets`` when there are more)."""

    sizes: list[int] = field(default_factory=list)
    max_subsets: int = 100
    seed: int = 0


@dataclass
class Selection:
    """Hyperparameter selection on validation data: ``grid`` maps parameters of the detector to the values to
    try (the others keep the detector's values); ``metric`` (``"auroc"`` or ``"fpr95"``, under the run's
    positive convention) of the ID validation split against the OOD validation sets, averaged over them,
    decides. Ties go to the first grid point (grid order)."""

    metric: str = "auroc"
    grid: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in SELECT_METRICS:
            raise ParameterError("experiment", "select", self.metric, f"is not one of {', '.join(SELECT_METRICS)}")

    def points(self, detector: Detector) -> list[Detector]:
        """The detector at every point of the grid (cartesian product, grid order), each validated."""
        known = [f.name for f in detector.params()]
        for p, values in self.grid.items():
            if p not in known:
                raise OodensError(f"grid parameter {p!r} is not a hyperparameter of {detector.name}: expected "
                                  f"{', '.join(known) or 'none (it has no hyperparameters)'}")
            if not values:
                raise ParameterError(detector.name, p, "[]", "is an empty grid: expected at least one value")
        names = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[p] for p in names)):
            out.append(type(detector)(**{**detector.settings(), **dict(zip(names, values))}).validate())
        return out

    def best(self, values: list[float]) -> int:
        """The index of the best validation metric (the first of ties)."""
        v = np.asarray(values, dtype=np.float64)
        return int(np.argmax(v) if METRICS[self.metric].higher_is_better else np.argmin(v))


@dataclass
class DetectorRun:
    detector: str
    strategy: str
    params: dict
    records: list[dict]
    #: member name (mode names and "ensemble") -> dataset ("id" or OOD name) -> scores
    scores: dict[str, dict[str, np.ndarray]] = field(repr=False)
    #: with selection: member name (mode names and "ensemble") -> the chosen values and their validation metric
    selected: dict[str, dict] = field(default_factory=dict)


def _std(values) -> float | None:
    """Sample std (ddof=1); None (undefined) for fewer than two values: one member, one subset."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def subsets(n: int, k: int, max_subsets: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Every k-of-n subset (sorted), or a seeded sample of ``max_subsets`` distinct ones when there are more."""
    if math.comb(n, k) <= max_subsets:
        return list(itertools.combinations(range(n), k))
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < max_subsets:
        chosen.add(tuple(sorted(rng.choice(n, size=k, replace=False).tolist())))
    return sorted(chosen)


def _groups(kinds: dict[str, str]) -> dict[str, list[str]]:
    """Rows that average other rows: "average" over semantic sets (and "near"/"far" over the
    benchmark's near- and far-OOD sets when it names both), "C-<s>" over shift sets of severity s."""
    semantic = [o for o, k in kinds.items() if k != "shift"]
    groups = {AVERAGE: semantic} if len(semantic) > 1 else {}
    near, far = [o for o, k in kinds.items() if k == "near"], [o for o, k in kinds.items() if k == "far"]
    if near and far:  # a group of one set would only repeat that set's row
        groups.update({name: sets for name, sets in (("near", near), ("far", far)) if len(sets) > 1})
    for o, k in kinds.items():
        if k == "shift" and re.fullmatch(r".+-[1-5]", o):  # corrupted copies <name>-<severity>
            groups.setdefault(f"C-{o.rsplit('-', 1)[1]}", []).append(o)
    return groups


def _row_kind(ood: str, kinds: dict[str, str]) -> str:
    if ood in kinds:
        return kinds[ood]
    return "shift-average" if ood.startswith("C-") else "average"


def _metrics(scores: dict[str, np.ndarray], kinds: dict[str, str], positive: str,
             accuracies: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """OOD set (and average row) -> metric -> value, for one member's or one ensemble's scores (a masked set
    against the ID scores restricted to its classes, ``ID_KEY@<set>``, when they are there)."""
    out = {o: ood_metrics(scores.get(masked_id_key(o), scores[ID_KEY]), scores[o], positive=positive) for o in kinds}
    for o, acc in (accuracies or {}).items():
        out[o]["ood_accuracy"] = acc
    for row, members in _groups(kinds).items():
        keys = [k for k in out[members[0]] if all(k in out[m] for m in members)]
        out[row] = {k: float(np.mean([out[m][k] for m in members])) for k in keys}
    return out


# --------------------------------------------------------------------------- ID quality (once per mode set)
# A leave-out member (``Views.classes`` set: the dataset class of each of its outputs) is judged on the
# test samples of its kept classes, its outputs mapped back to the dataset's classes. Leave-out members
# cannot average logits (their columns are different classes), so their ensemble predicts with the mean
# of the members' softmax spread over all classes (0 for the classes a member left out).


def _kept(v: Views, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the samples whose class the member predicts, their index among its outputs)."""
    labels = np.asarray(labels)
    if v.classes is None:
        return np.ones(len(labels), dtype=bool), labels
    classes = np.asarray(v.classes)
    table = np.full(max(int(classes.max()), int(labels.max(initial=0))) + 1, -1)
    table[classes] = np.arange(len(classes))
    target = table[np.clip(labels, 0, None)]
    keep = (labels >= 0) & (target >= 0)
    return keep, target


def member_accuracy(v: Views, labels: np.ndarray) -> float:
    keep, target = _kept(v, labels)
    return accuracy(np.asarray(v.logits)[keep], target[keep])


def member_quality(v: Views, labels: np.ndarray) -> dict[str, float]:
    """accuracy, nll, brier, ece of one member (on its kept classes for a leave-out member)."""
    keep, target = _kept(v, labels)
    return cal.quality(cal.probs(np.asarray(v.logits)[keep]), target[keep])


def ensemble_probs(views: list[Views], labels: np.ndarray) -> np.ndarray:
    """Mean of the members' softmax over the dataset's classes (n, C)."""
    if all(v.classes is None for v in views):
        return np.mean([cal.probs(v.logits) for v in views], axis=0)
    c = 1 + max(int(np.max(labels, initial=0)), *(int(np.max(v.classes)) for v in views if v.classes is not None))
    total = 0.0
    for v in views:
        p = cal.probs(v.logits)
        full = np.zeros((len(p), c))
        full[:, np.asarray(v.classes) if v.classes is not None else np.arange(p.shape[1])] = p
        total = total + full
    return total / len(views)


def ensemble_accuracy(views: list[Views], labels: np.ndarray) -> float:
    """argmax of the averaged logits; for leave-out members, of the averaged probabilities."""
    if all(v.classes is None for v in views):
        return accuracy(np.mean([np.asarray(v.logits, dtype=np.float64) for v in views], axis=0), labels)
    return accuracy(ensemble_probs(views, labels), labels)


def _prefixed(q: dict[str, float]) -> dict[str, float]:
    return {"id_accuracy": q["accuracy"], **{f"id_{k}": v for k, v in q.items() if k != "accuracy"}}


def _check_logits(member: str, key: str, v: Views) -> None:
    z = np.asarray(v.logits)
    bad = int(z.size - np.count_nonzero(np.isfinite(z)))
    if bad:
        raise OodensError(f"logits of mode {member} on {_set_name(key)}: {bad} of {z.size} values are not finite "
                          "(expected finite logits: check the mode's weights)")


class Quality:
    """ID quality of a mode set, computed once and shared by every detector's records: ``rows[name]``
    (each member and ``"ensemble"``) = id_accuracy, id_nll, id_brier, id_ece; ``shift[name][set]`` =
    accuracy on each covariate-shift set; :meth:`subset` = (ID accuracy, shift accuracies) of a subset's
    ensemble (memoised, for the ensemble-size sweep)."""

    def __init__(self, sets: MemberSet):
        labels = sets.labels
        self._sets = sets
        # a masked set is labelled with positions in its kept classes, a covariate-shift set with its own labels
        # (OpenOOD's cifar10c, or corrupted copies of the ID test split); semantic OOD sets need none
        self._labels = {o: (np.asarray(sets.oods[o][0].labels) if o in sets.masks or sets.kinds.get(o) == "shift"
                            else labels) for o in sets.oods}
        for i, m in enumerate(sets.names):  # before any calibration arithmetic on them
            for key, v in [(ID_KEY, sets.test[i])] + [(o, sets.oods[o][i]) for o, k in sets.kinds.items()
                                                       if k == "shift"]:
                _check_logits(m, key, v)
        self.rows = {m: _prefixed(member_quality(v, labels)) for m, v in zip(sets.names, sets.test)}
        self.rows["ensemble"] = {**_prefixed(cal.quality(ensemble_probs(sets.test, labels), labels)),
                                 "id_accuracy": ensemble_accuracy(sets.test, labels)}
        self._shift_sets = [o for o, k in sets.kinds.items() if k == "shift"]
        self.shift = {m: {o: member_accuracy(sets.oods[o][i], self._labels[o]) for o in self._shift_sets}
                      for i, m in enumerate(sets.names)}
        self.shift["ensemble"] = {o: ensemble_accuracy(sets.oods[o], self._labels[o]) for o in self._shift_sets}
        self.subset = lru_cache(maxsize=None)(self._subset)
        #: the soup's quality (a shared-backbone set), as a one-member set's: rows["soup"], shift["soup"]
        self.soup = Quality(sets.soup) if sets.soup is not None else None

    def _subset(self, idx: tuple[int, ...]) -> tuple[float, dict[str, float]]:
        labels, s = self._sets.labels, self._sets
        return (ensemble_accuracy([s.test[i] for i in idx], labels),
                {o: ensemble_accuracy([s.oods[o][i] for i in idx], self._labels[o]) for o in self._shift_sets})


# --------------------------------------------------------------------------- one detector


def _fresh(detector: Detector) -> Detector:
    """An unfitted copy with the same hyperparameters."""
    return type(detector)(**detector.settings())


class Candidate:
    """One point of the hyperparameter grid (the detector with those values) on a member set: each member's
    detector, fitted on first use on its ID-train (and ID-validation) views, and its scores per set, memoised,
    so every strategy and every subset reuses them. Nothing here runs a network: it reads cached views."""

    def __init__(self, detector: Detector, sets: MemberSet):
        self.detector, self.sets = detector, sets
        self._fitted: dict[int, Detector] = {}
        self._scores: dict[tuple[int, str], np.ndarray] = {}

    def fitted(self, i: int) -> Detector:
        if i not in self._fitted:
            det = _fresh(self.detector)
            if det.needs_fit and not det.ensemble_only:
                if det.reads("val") and self.sets.val is None:
                    raise OodensError(f"{det.name} fits on the ID validation split: expected MemberSet.val (the "
                                      "members' views of it)")
                det.fit_splits(self.sets.train[i], self.sets.val[i] if det.reads("val") else None)
            self._fitted[i] = det
        return self._fitted[i]

    def score(self, i: int, key: str) -> np.ndarray:
        """Member ``i``'s scores on the set ``key`` (see :meth:`MemberSet.views`)."""
        if (i, key) not in self._scores:
            s = self.fitted(i).score(self.sets.views(key)[i])
            check_finite(self.detector, self.sets.names[i], {key: s})
            self._scores[(i, key)] = s
        return self._scores[(i, key)]

    def ensemble(self, strategy: str, idx, keys: list[str]) -> dict[str, np.ndarray]:
        """The ensemble of the members ``idx`` under ``strategy`` on the sets ``keys``."""
        s, sets = STRATEGIES[strategy], self.sets
        pick = lambda views: [views[i] for i in idx]  # noqa: E731
        out = ensemble_scores(
            strategy, lambda: _fresh(self.detector), [self.fitted(i) for i in idx], pick(sets.train),
            {k: pick(sets.views(k)) for k in keys}, val=pick(sets.val) if sets.val is not None else None,
            member_scores={k: [self.score(i, k) for i in idx] for k in keys} if s.scores is not None else None,
            val_scores=[self.score(i, VAL_KEY) for i in idx] if s.needs_val else None)
        check_finite(self.detector, "ensemble", out)
        return out


def check_finite(detector: Detector, member: str, scores: dict[str, np.ndarray]) -> None:
    """An :class:`OodensError` naming the detector, the member (a mode name or ``ensemble``), the set and the
    count when some of ``scores`` (dataset -> scores) are NaN or infinite: the metrics need finite scores."""
    for key, s in scores.items():
        s = np.asarray(s)
        bad = int(s.size - np.count_nonzero(np.isfinite(s)))
        if bad:
            whose = "the ensemble" if member == "ensemble" else f"mode {member}"
            weights = "the modes' weights" if member == "ensemble" else "the mode's weights"
            raise OodensError(f"{detector.name} scores of {whose} on {_set_name(key)}: {bad} of {s.size} are not "
                              f"finite (expected finite scores: check {weights} and {detector.name}'s "
                              "hyperparameters)")


def _set_name(key: str) -> str:
    if key == ID_KEY:
        return "the ID test split"
    if key == VAL_KEY:
        return "the ID validation split"
    return key[len(VAL_OOD):] if key.startswith(VAL_OOD) else key


class _Chooser:
    """Picks a grid point for each member and each ensemble (a tuple of member indices) on the validation sets
    only; without a :class:`Selection` there is one candidate and nothing is read."""

    def __init__(self, candidates: list[Candidate], strategy: str, positive: str, select: Selection | None):
        self.candidates, self.strategy, self.positive, self.select = candidates, strategy, positive, select

    def _objective(self, scores: dict[str, np.ndarray]) -> float:
        keys = self.candidates[0].sets.val_keys
        return float(np.mean([ood_metrics(scores[VAL_KEY], scores[k], positive=self.positive)[self.select.metric]
                              for k in keys]))

    def _pick(self, scores_of) -> tuple[Candidate, dict]:
        if self.select is None or len(self.candidates) == 1 and not self.select.grid:
            return self.candidates[0], {}
        keys = [VAL_KEY, *self.candidates[0].sets.val_keys]
        values = [self._objective(scores_of(c, keys)) for c in self.candidates]
        best = self.select.best(values)
        chosen = self.candidates[best].detector
        return self.candidates[best], {"params": {p: getattr(chosen, p) for p in self.select.grid},
                                       self.select.metric: values[best]}

    def member(self, i: int) -> tuple[Candidate, dict]:
        return self._pick(lambda c, keys: {k: c.score(i, k) for k in keys})

    def ensemble(self, idx: tuple[int, ...]) -> tuple[Candidate, dict]:
        return self._pick(lambda c, keys: c.ensemble(self.strategy, idx, keys))


def evaluate_detector(detector: Detector, sets: MemberSet, strategy: str | None = None, positive: str = "id",
                      sweep: Sweep | None = None, quality: Quality | None = None, select: Selection | None = None,
                      candidates: list[Candidate] | None = None) -> DetectorRun:
    """Score one detector (an instance: its hyperparameters) for every member, for the ensemble under
    ``strategy`` (the detector's default when None) and for every subset of the sweep; compute every metric.
    ``select``: choose grid values on the validation sets per member, for the ensemble and per subset.
    ``candidates``: the grid's :class:`Candidate` s on ``sets`` when already built (shared by strategies)."""
    strategy = resolve_strategy(type(detector), strategy, leave_out=sets.leave_out)
    check_members(strategy, len(sets.names))
    if select is not None and not sets.val_oods:
        raise OodensError("selection needs OOD validation sets: expected a benchmark with some, or val_ood "
                          "NAME=PATH (--val-ood)")
    quality = quality or Quality(sets)
    candidates = candidates or [Candidate(d, sets) for d in (select.points(detector) if select else [detector])]
    chooser = _Chooser(candidates, strategy, positive, select)
    kinds = sets.kinds
    evals = [ID_KEY, *sets.id_keys, *sets.oods]
    per_member, selected = {}, {}
    # numpy's overflow/invalid warnings are replaced by check_finite's one error naming the member and set
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i, m in enumerate([] if detector.ensemble_only else sets.names):
            cand, selected[m] = chooser.member(i)
            per_member[m] = {k: cand.score(i, k) for k in evals}
        cand, selected["ensemble"] = chooser.ensemble(tuple(range(len(sets.names))))
        ens = cand.ensemble(strategy, range(len(sets.names)), evals)
        soup = None
        if sets.soup is not None and not detector.ensemble_only:  # the soup: one more member, its own row
            soup_chooser = _Chooser([Candidate(c.detector, sets.soup) for c in candidates], strategy, positive, select)
            cand, selected["soup"] = soup_chooser.member(0)
            soup = {k: cand.score(0, k) for k in evals}
    metrics = {m: _metrics(s, kinds, positive, quality.shift[m]) for m, s in per_member.items()}
    metrics["ensemble"] = _metrics(ens, kinds, positive, quality.shift["ensemble"])
    soup_quality = quality.soup if quality.soup is not None else (Quality(sets.soup) if soup is not None else None)
    if soup is not None:
        metrics["soup"] = _metrics(soup, kinds, positive, soup_quality.shift["soup"])

    params = {**detector.settings(), **(select.grid if select else {})}
    base = {"detector": detector.name, "strategy": strategy, "params": params, "positive": positive,
            "n_members": len(sets.names)}
    chosen = lambda m: {"selected": selected[m]} if selected.get(m) else {}  # noqa: E731
    records = []
    for ood in metrics["ensemble"]:
        row = {**base, "ood": ood, "kind": _row_kind(ood, kinds)}
        if per_member:
            values = {m: {**metrics[m][ood], **quality.rows[m]} for m in sets.names}
            for m in sets.names:
                records.append({**row, "member": m, "role": "member", "k": 1, **values[m], **chosen(m)})
            keys = list(values[sets.names[0]])
            records.append({**row, "member": "mean", "role": "mean",
                            **{k: float(np.mean([values[m][k] for m in sets.names])) for k in keys}})
            records.append({**row, "member": "std", "role": "std",
                            **{k: _std([values[m][k] for m in sets.names]) for k in keys}})
        if soup is not None:
            records.append({**row, "member": "soup", "role": "soup", "k": 1, **metrics["soup"][ood],
                            **soup_quality.rows["soup"], **chosen("soup")})
        records.append({**row, "member": "ensemble", "role": "ensemble", "k": len(sets.names),
                        **metrics["ensemble"][ood], **quality.rows["ensemble"], **chosen("ensemble")})
    records += _sweep_records(detector, strategy, chooser, sets, positive, sweep, quality, base)

    name = lambda k: "id" + k[len(ID_KEY):] if k.startswith(ID_KEY) else k  # noqa: E731  ("id", "id@<set>")
    scores = {m: {name(k): v for k, v in s.items()} for m, s in per_member.items()}
    scores["ensemble"] = {name(k): v for k, v in ens.items()}
    if soup is not None:
        scores["soup"] = {name(k): v for k, v in soup.items()}
    return DetectorRun(detector.name, strategy, params, records, scores, {m: v for m, v in selected.items() if v})


def _sweep_records(detector: Detector, strategy: str, chooser: _Chooser, sets: MemberSet, positive: str,
                   sweep: Sweep | None, quality: Quality, base: dict) -> list[dict]:
    """Mean and std over the k-of-N subsets of each metric, for each k of the sweep (each subset an ensemble
    with its own choice of grid values under selection)."""
    records = []
    smallest = max(STRATEGIES[strategy].min_members, 2 if detector.ensemble_only else 1)
    evals = [ID_KEY, *sets.id_keys, *sets.oods]
    for k in (sweep.sizes if sweep else []):
        if k < smallest:
            continue
        chosen = subsets(len(sets.names), k, sweep.max_subsets, sweep.seed)
        per_subset, accs = [], []
        for sub in chosen:
            id_acc, shift_acc = quality.subset(sub)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                cand, _ = chooser.ensemble(sub)
                s = cand.ensemble(strategy, sub, evals)
            per_subset.append(_metrics(s, sets.kinds, positive, shift_acc))
            accs.append(id_acc)
        for ood in per_subset[0]:
            vals = {key: [ms[ood][key] for ms in per_subset] for key in per_subset[0][ood]}
            row = {**base, "member": "subsets", "role": "subsets", "k": k, "n_subsets": len(chosen), "ood": ood,
                   "kind": _row_kind(ood, sets.kinds)}
            records.append({**row, "stat": "mean", **{key: float(np.mean(v)) for key, v in vals.items()},
                            "id_accuracy": float(np.mean(accs))})
            records.append({**row, "stat": "std", **{key: _std(v) for key, v in vals.items()},
                            "id_accuracy": _std(accs)})
    return records
