"""Scoring: detectors per member and per ensemble strategy, metrics, and the records eval prints and stores.

Records are flat dicts (one per detector x strategy x row x OOD set). ``member`` is a
mode name, ``"mean"``/``"std"`` (over modes, sample std), ``"ensemble"``, or for the
ensemble-size sweep ``"subsets-<k>-mean"``/``"subsets-<k>-std"`` (over the k-of-N
subsets, with ``n_subsets``). ``ood`` is an OOD set name, ``"average"`` (mean over the
semantic OOD sets, taken per row before mean/std; only when there are several) or
``"near"``/``"far"`` (means over the benchmark's near-/far-OOD sets, when it names both) or
``"C-<s>"`` (mean over the covariate-shift sets of severity s). Every row also carries the
ID-test quality ``id_accuracy`` (argmax of the averaged logits for the ensemble) and
``id_nll``, ``id_brier``, ``id_ece`` (15 bins; the ensemble's predictive distribution is the
mean of the members' softmax). Leave-out members (ELOC; ``Views.classes`` set) are judged on the test
samples of their kept classes, and their ensemble's distribution spreads each member's softmax over all
classes (0 where it left classes out) before averaging; its accuracy is that mean's argmax. Records of
covariate-shift sets (``kind: "shift"``) also carry ``ood_accuracy``, the accuracy on
the corrupted images. Metric values are fractions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from oodens import calibration as cal
from oodens.detectors import get_detector
from oodens.metrics import METRICS, accuracy, ood_metrics
from oodens.strategies import ensemble_scores, resolve_strategy
from oodens.views import Views

AVERAGE = "average"
ID_KEY = "__id__"


@dataclass
class DetectorRun:
    detector: str
    strategy: str
    params: dict
    records: list[dict]
    #: member name (mode names and "ensemble") -> dataset ("id" or OOD name) -> scores
    scores: dict[str, dict[str, np.ndarray]] = field(repr=False)


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
    out = {o: ood_metrics(scores[ID_KEY], scores[o], positive=positive) for o in kinds}
    for o, acc in (accuracies or {}).items():
        out[o]["ood_accuracy"] = acc
    for row, members in _groups(kinds).items():
        keys = [k for k in out[members[0]] if all(k in out[m] for m in members)]
        out[row] = {k: float(np.mean([out[m][k] for m in members])) for k in keys}
    return out


# ID quality of members and ensembles. A leave-out member (``Views.classes`` set: the dataset class of
# each of its outputs) is judged on the test samples of its kept classes, its outputs mapped back to
# the dataset's classes. Leave-out members cannot average logits (their columns are different
# classes), so their ensemble predicts with the mean of the members' softmax spread over all classes
# (0 for the classes a member left out; every class is kept by K - 1 of the K members).


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


def evaluate_detector(
    name: str,
    params: dict,
    strategy: str | None,
    members: list[str],
    train: list[Views],
    id_test: list[Views],
    oods: dict[str, list[Views]],
    positive: str = "id",
    ensemble_sizes: list[int] = (),
    max_subsets: int = 100,
    seed: int = 0,
    kinds: dict[str, str] | None = None,
) -> DetectorRun:
    """Score one detector for every member and for the ensemble; compute every metric.

    ``ensemble_sizes`` adds, for each k, mean and std of the metrics over k-of-N subsets
    of the members (all of them, or a seeded sample of ``max_subsets``).
    """
    cls = get_detector(name)
    strategy = resolve_strategy(cls, strategy, leave_out=any(v.classes is not None for v in id_test))
    kinds = {o: (kinds or {}).get(o, "semantic") for o in oods}

    def make():
        return cls(**params)

    fitted = []
    for i in range(len(members)):
        det = make()
        if det.needs_fit and not cls.ensemble_only:
            det.fit(train[i])
        fitted.append(det)
    evals = {ID_KEY: id_test, **oods}
    per_member: dict[str, dict[str, np.ndarray]] = {}
    if not cls.ensemble_only:
        for i, m in enumerate(members):
            per_member[m] = {k: fitted[i].score(v[i]) for k, v in evals.items()}
    ens = ensemble_scores(strategy, make, fitted, train, evals)

    def accuracies(views: list[Views], idx: list[int]) -> tuple[dict[int, float], float]:
        labels = np.asarray(views[0].labels)
        each = {i: member_accuracy(views[i], labels) for i in idx}
        return each, ensemble_accuracy([views[i] for i in idx], labels)

    everyone = list(range(len(members)))
    labels = np.asarray(id_test[0].labels)
    idq = {m: {f"id_{k}": v for k, v in member_quality(id_test[i], labels).items() if k != "accuracy"}
           for i, m in enumerate(members)}
    idq["ensemble"] = {f"id_{k}": v for k, v in cal.quality(ensemble_probs(id_test, labels), labels).items()
                       if k != "accuracy"}
    each, ens_acc = accuracies(id_test, everyone)
    acc = {**{members[i]: a for i, a in each.items()}, "ensemble": ens_acc}
    for m in idq:
        idq[m] = {"id_accuracy": acc[m], **idq[m]}
    shift_acc = {o: accuracies(oods[o], everyone) for o, k in kinds.items() if k == "shift"}

    metrics = {m: _metrics(s, kinds, positive, {o: a[0][i] for o, a in shift_acc.items()})
               for i, (m, s) in enumerate(per_member.items())}
    metrics["ensemble"] = _metrics(ens, kinds, positive, {o: a[1] for o, a in shift_acc.items()})
    rows_oods = list(metrics["ensemble"])

    base = {"detector": name, "strategy": strategy, "params": dict(make().settings()), "positive": positive,
            "n_members": len(members)}
    records = []
    for ood in rows_oods:
        base["kind"] = _row_kind(ood, kinds)
        if per_member:
            for m in members:
                records.append({**base, "member": m, "ood": ood, **metrics[m][ood], **idq[m]})
            stacked = {k: [{**metrics[m][ood], **idq[m]}[k] for m in members]
                       for k in {**metrics[members[0]][ood], **idq[members[0]]}}
            records.append({**base, "member": "mean", "ood": ood, **{k: float(np.mean(v)) for k, v in stacked.items()}})
            records.append({**base, "member": "std", "ood": ood, **{k: _std(v) for k, v in stacked.items()}})
        records.append({**base, "member": "ensemble", "ood": ood, **metrics["ensemble"][ood], **idq["ensemble"]})

    for k in ensemble_sizes:
        if cls.ensemble_only and k < 2:
            continue
        chosen = subsets(len(members), k, max_subsets, seed)
        per_subset = []
        sub_acc = []
        for sub in chosen:
            s = ensemble_scores(strategy, make, [fitted[i] for i in sub], [train[i] for i in sub],
                                {key: [v[i] for i in sub] for key, v in evals.items()})
            per_subset.append(_metrics(s, kinds, positive,
                                       {o: accuracies(oods[o], list(sub))[1] for o in shift_acc}))
            sub_acc.append(accuracies(id_test, list(sub))[1])
        for ood in rows_oods:
            base["kind"] = _row_kind(ood, kinds)
            vals = {key: [ms[ood][key] for ms in per_subset] for key in per_subset[0][ood]}
            extra = {"n_subsets": len(chosen), "ensemble_size": k}
            records.append({**base, "member": f"subsets-{k}-mean", "ood": ood, **extra,
                            **{key: float(np.mean(v)) for key, v in vals.items()}, "id_accuracy": float(np.mean(sub_acc))})
            records.append({**base, "member": f"subsets-{k}-std", "ood": ood, **extra,
                            **{key: _std(v) for key, v in vals.items()}, "id_accuracy": _std(sub_acc)})

    scores = {m: {("id" if k == ID_KEY else k): v for k, v in s.items()} for m, s in per_member.items()}
    scores["ensemble"] = {("id" if k == ID_KEY else k): v for k, v in ens.items()}
    return DetectorRun(name, strategy, base["params"], records, scores)
