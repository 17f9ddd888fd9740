"""Scoring: detectors per member and per ensemble strategy, metrics, and the records eval prints and stores.

Records are flat dicts (one per detector x strategy x member-row x OOD set):
``member`` is a mode name, ``"mean"``, ``"std"`` (over modes, sample std) or
``"ensemble"``; ``ood`` is an OOD set name or ``"average"`` (mean over the OOD sets,
taken per member before mean/std; only when there are several sets). Metric values are fractions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from oodens.detectors import get_detector
from oodens.metrics import METRICS, accuracy, ood_metrics
from oodens.strategies import ensemble_scores, mean_logits, resolve_strategy
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


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate_detector(
    name: str,
    params: dict,
    strategy: str | None,
    members: list[str],
    train: list[Views],
    id_test: list[Views],
    oods: dict[str, list[Views]],
    positive: str = "id",
) -> DetectorRun:
    """Score one detector for every member and for the ensemble; compute every metric."""
    cls = get_detector(name)
    strategy = resolve_strategy(cls, strategy)

    def make():
        return cls(**params)

    per_member: dict[str, dict[str, np.ndarray]] = {}
    for i, m in enumerate(members):
        det = make()
        if det.needs_fit:
            det.fit(train[i])
        per_member[m] = {ID_KEY: det.score(id_test[i])}
        per_member[m].update({o: det.score(v[i]) for o, v in oods.items()})
    evals = {ID_KEY: id_test, **oods}
    member_scores = {k: [per_member[m][k] for m in members] for k in evals}
    ens = ensemble_scores(strategy, make, train, evals, member_scores)

    labels = np.asarray(id_test[0].labels)
    acc = {m: accuracy(np.asarray(id_test[i].logits), labels) for i, m in enumerate(members)}
    acc["ensemble"] = accuracy(mean_logits(id_test, None).logits, labels)

    # metrics[row][ood] = dict of metric values
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for row, scores in [*per_member.items(), ("ensemble", ens)]:
        metrics[row] = {o: ood_metrics(scores[ID_KEY], scores[o], positive=positive) for o in oods}
        if len(oods) > 1:
            metrics[row][AVERAGE] = {k: float(np.mean([metrics[row][o][k] for o in oods])) for k in METRICS}

    base = {"detector": name, "strategy": strategy, "params": dict(make().settings()), "positive": positive,
            "n_members": len(members)}
    records = []
    for ood in [*oods, AVERAGE] if len(oods) > 1 else list(oods):
        for m in members:
            records.append({**base, "member": m, "ood": ood, **metrics[m][ood], "id_accuracy": acc[m]})
        stacked = {k: np.array([metrics[m][ood][k] for m in members]) for k in METRICS}
        accs = np.array([acc[m] for m in members])
        records.append({**base, "member": "mean", "ood": ood, **{k: float(v.mean()) for k, v in stacked.items()},
                        "id_accuracy": float(accs.mean())})
        records.append({**base, "member": "std", "ood": ood, **{k: _std(v) for k, v in stacked.items()},
                        "id_accuracy": _std(accs)})
        records.append({**base, "member": "ensemble", "ood": ood, **metrics["ensemble"][ood],
                        "id_accuracy": acc["ensemble"]})

    scores = {m: {("id" if k == ID_KEY else k): v for k, v in s.items()} for m, s in per_member.items()}
    scores["ensemble"] = {("id" if k == ID_KEY else k): v for k, v in ens.items()}
    return DetectorRun(name, strategy, base["params"], records, scores)
