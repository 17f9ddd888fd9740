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

Every row also carries ``id_accuracy`` (argmax of the averaged logits for an ensemble), ``id_nll``,
``id_brier``, ``id_ece`` (15 bins; an ensemble's predictive distribution is the mean of its members'
softmax). Leave-out members (ELOC; ``Views.classes`` set) are judged on the test samples of their kept
classes, and their ensemble's distribution spreads each member's softmax over all classes (0 where it
left classes out) before averaging; its accuracy is that mean's argmax. Rows of covariate-shift sets
also carry ``ood_accuracy``, the accuracy on the corrupted images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from oodens.detectors import Detector
from oodens.errors import OodensError
from oodens.ensemble.strategies import ensemble_scores, resolve_strategy
from oodens.metrics import calibration as cal
from oodens.metrics.ood import accuracy, ood_metrics
from oodens.views.types import Views

AVERAGE = "average"
ID_KEY = "__id__"


@dataclass
class MemberSet:
    """The views one evaluation reads, member by member (lists in member order).

    ``train`` may hold ``None`` when no detector fits; ``kinds`` maps each OOD set to near, far,
    semantic or shift (semantic when not given)."""

    names: list[str]
    train: list[Views | None]
    test: list[Views]
    oods: dict[str, list[Views]]
    kinds: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.kinds = {o: self.kinds.get(o, "semantic") for o in self.oods}

    @property
    def leave_out(self) -> bool:
        return any(v.classes is not None for v in self.test)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.test[0].labels)

    def subset(self, idx) -> "MemberSet":
        return MemberSet([self.names[i] for i in idx], [self.train[i] for i in idx], [self.test[i] for i in idx],
                         {o: [v[i] for i in idx] for o, v in self.oods.items()}, self.kinds)


@dataclass
class Sweep:
    """The ensemble-size sweep: for each k in ``sizes``, every k-of-N subset (or a seeded sample of
    ``max_subsets`` when there are more)."""

    sizes: list[int] = field(default_factory=list)
    max_subsets: int = 100
    seed: int = 0


@dataclass
class DetectorRun:
    detector: str
    strategy: str
    params: dict
    records: list[dict]
    #: member name (mode names and "ensemble") -> dataset ("id" or OOD name) -> scores
    scores: dict[str, dict[str, np.ndarray]] = field(repr=False)


def _set_name(key: str) -> str:
    return "the ID test split" if key == ID_KEY else key


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


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
        if k == "shift":
            groups.setdefault(f"C-{o.rsplit('-', 1)[1]}", []).append(o)
    return groups


def _row_kind(ood: str, kinds: dict[str, str]) -> str:
    if ood in kinds:
        return kinds[ood]
    return "shift-average" if ood.startswith("C-") else "average"


def _metrics(scores: dict[str, np.ndarray], kinds: dict[str, str], positive: str,
             accuracies: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """OOD set (and average row) -> metric -> value, for one member's or one ensemble's scores."""
    out = {o: ood_metrics(scores[ID_KEY], scores[o], positive=positive) for o in kinds}
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
        for i, m in enumerate(sets.names):  # before any calibration arithmetic on them
            for key, v in [(ID_KEY, sets.test[i])] + [(o, sets.oods[o][i]) for o, k in sets.kinds.items()
                                                       if k == "shift"]:
                _check_logits(m, key, v)
        self.rows = {m: _prefixed(member_quality(v, labels)) for m, v in zip(sets.names, sets.test)}
        self.rows["ensemble"] = {**_prefixed(cal.quality(ensemble_probs(sets.test, labels), labels)),
                                 "id_accuracy": ensemble_accuracy(sets.test, labels)}
        self._shift_sets = [o for o, k in sets.kinds.items() if k == "shift"]
        self.shift = {m: {o: member_accuracy(sets.oods[o][i], labels) for o in self._shift_sets}
                      for i, m in enumerate(sets.names)}
        self.shift["ensemble"] = {o: ensemble_accuracy(sets.oods[o], labels) for o in self._shift_sets}
        self.subset = lru_cache(maxsize=None)(self._subset)

    def _subset(self, idx: tuple[int, ...]) -> tuple[float, dict[str, float]]:
        labels, s = self._sets.labels, self._sets
        return (ensemble_accuracy([s.test[i] for i in idx], labels),
                {o: ensemble_accuracy([s.oods[o][i] for i in idx], labels) for o in self._shift_sets})


# --------------------------------------------------------------------------- one detector


def _fresh(detector: Detector) -> Detector:
    """An unfitted copy with the same hyperparameters."""
    return type(detector)(**detector.settings())


def score_members(detector: Detector, sets: MemberSet) -> tuple[list[Detector], dict[str, dict[str, np.ndarray]]]:
    """Each member's own fitted detector, and its scores on the ID test split and every OOD set (none for
    ensemble-only detectors)."""
    fitted = []
    for i in range(len(sets.names)):
        det = _fresh(detector)
        if det.needs_fit and not det.ensemble_only:
            det.fit(sets.train[i])
        fitted.append(det)
    if detector.ensemble_only:
        return fitted, {}
    evals = {ID_KEY: sets.test, **sets.oods}
    return fitted, {m: {k: fitted[i].score(v[i]) for k, v in evals.items()} for i, m in enumerate(sets.names)}


def score_ensemble(detector: Detector, strategy: str, fitted: list[Detector], sets: MemberSet) -> dict[str, np.ndarray]:
    """The ensemble's scores on the ID test split and every OOD set under ``strategy``."""
    return ensemble_scores(strategy, lambda: _fresh(detector), fitted, sets.train, {ID_KEY: sets.test, **sets.oods})


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


def evaluate_detector(detector: Detector, sets: MemberSet, strategy: str | None = None, positive: str = "id",
                      sweep: Sweep | None = None, quality: Quality | None = None) -> DetectorRun:
    """Score one detector (an instance: its hyperparameters) for every member, for the ensemble under
    ``strategy`` (the detector's default when None) and for every subset of the sweep; compute every metric."""
    strategy = resolve_strategy(type(detector), strategy, leave_out=sets.leave_out)
    quality = quality or Quality(sets)
    kinds = sets.kinds
    # numpy's overflow/invalid warnings are replaced by check_finite's one error naming the member and set
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fitted, per_member = score_members(detector, sets)
        for m, s in per_member.items():
            check_finite(detector, m, s)
        ens = score_ensemble(detector, strategy, fitted, sets)
        check_finite(detector, "ensemble", ens)
    metrics = {m: _metrics(s, kinds, positive, quality.shift[m]) for m, s in per_member.items()}
    metrics["ensemble"] = _metrics(ens, kinds, positive, quality.shift["ensemble"])

    base = {"detector": detector.name, "strategy": strategy, "params": dict(detector.settings()),
            "positive": positive, "n_members": len(sets.names)}
    records = []
    for ood in metrics["ensemble"]:
        row = {**base, "ood": ood, "kind": _row_kind(ood, kinds)}
        if per_member:
            values = {m: {**metrics[m][ood], **quality.rows[m]} for m in sets.names}
            for m in sets.names:
                records.append({**row, "member": m, "role": "member", "k": 1, **values[m]})
            keys = list(values[sets.names[0]])
            records.append({**row, "member": "mean", "role": "mean",
                            **{k: float(np.mean([values[m][k] for m in sets.names])) for k in keys}})
            records.append({**row, "member": "std", "role": "std",
                            **{k: _std([values[m][k] for m in sets.names]) for k in keys}})
        records.append({**row, "member": "ensemble", "role": "ensemble", "k": len(sets.names),
                        **metrics["ensemble"][ood], **quality.rows["ensemble"]})
    records += _sweep_records(detector, strategy, fitted, sets, positive, sweep, quality, base)

    scores = {m: {("id" if k == ID_KEY else k): v for k, v in s.items()} for m, s in per_member.items()}
    scores["ensemble"] = {("id" if k == ID_KEY else k): v for k, v in ens.items()}
    return DetectorRun(detector.name, strategy, base["params"], records, scores)


def _sweep_records(detector: Detector, strategy: str, fitted: list[Detector], sets: MemberSet, positive: str,
                   sweep: Sweep | None, quality: Quality, base: dict) -> list[dict]:
    """Mean and std over the k-of-N subsets of each metric, for each k of the sweep."""
    records = []
    for k in (sweep.sizes if sweep else []):
        if detector.ensemble_only and k < 2:
            continue
        chosen = subsets(len(sets.names), k, sweep.max_subsets, sweep.seed)
        per_subset, accs = [], []
        for sub in chosen:
            id_acc, shift_acc = quality.subset(sub)
            s = score_ensemble(detector, strategy, [fitted[i] for i in sub], sets.subset(sub))
            check_finite(detector, "ensemble", s)
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
