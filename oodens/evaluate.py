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
mean of the members' softmax). Records of
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
    strategy = resolve_strategy(cls, strategy)
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
        each = {i: accuracy(np.asarray(views[i].logits), labels) for i in idx}
        return each, accuracy(np.mean([np.asarray(views[i].logits, dtype=np.float64) for i in idx], axis=0), labels)

    everyone = list(range(len(members)))
    labels = np.asarray(id_test[0].labels)
    member_probs = [cal.probs(v.logits) for v in id_test]
    idq = {m: {f"id_{k}": v for k, v in cal.quality(member_probs[i], labels).items() if k != "accuracy"}
           for i, m in enumerate(members)}
    idq["ensemble"] = {f"id_{k}": v for k, v in cal.quality(np.mean(member_probs, axis=0), labels).items()
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
