"""The metric registry (DESIGN.md section 7): every metric oodens reports, with its direction.

:data:`METRICS` maps each metric's name to a :class:`Metric`: its table label, whether higher is
better, whether it is shown as a percentage, its kind, and for OOD metrics the function computing it.
Everything that needs to know about a metric (``ood_metrics``, ``oodens.metrics.stats``, ``oodens report``)
reads it here, so there is one place where a metric is defined.

Kinds:
- ``"ood"``: computed from a pair of ID and OOD scores (FPR95, AUROC, AUPR-In, AUPR-Out, detection error);
- ``"quality"``: ID-test quality and calibration of a member or the ensemble (accuracy here;
  NLL, Brier and ECE in :mod:`oodens.metrics.calibration`);
- ``"shift"``: accuracy on a covariate-shift set.

Scores follow one convention everywhere: higher = more in-distribution.
All values are fractions (NLL in nats); tables show percentages where ``percent`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_curve

POSITIVES = ("id", "ood")
KINDS = ("ood", "quality", "shift")


def fpr_at_95_tpr(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Fraction of negatives accepted at the largest threshold keeping >= 95% of positives.

    t is the ceil(0.95 * n_pos)-th largest positive score; negatives with score >= t
    count as false positives (ties included).
    """
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64))[::-1]
    k = math.ceil(0.95 * len(pos))
    t = pos[k - 1]
    return float(np.mean(np.asarray(neg_scores, dtype=np.float64) >= t))


def detection_error(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """min over thresholds t of 0.5 * (1 - TPR(t)) + 0.5 * FPR(t), ID positive."""
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of argmax logits (or probabilities)."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


# The registry's OOD functions: f(id_scores, ood_scores, positive) on finite float64 1-d arrays, one
# signature for all so that callers (ood_metrics, the bootstrap) need not know which uses `positive`.

def _fpr95(id_s: np.ndarray, ood_s: np.ndarray, positive: str = "id") -> float:
    """ID positive: OOD accepted when 95% of ID is kept; OOD positive: ID rejected when 95% of OOD is caught."""
    if positive == "id":
        return fpr_at_95_tpr(id_s, ood_s)
    if positive == "ood":
        return fpr_at_95_tpr(-ood_s, -id_s)
    raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")


def _auroc(id_s: np.ndarray, ood_s: np.ndarray, positive: str = "id") -> float:
    """AUROC as the Mann-Whitney statistic on mid-ranks, P(ID > OOD) + P(tie) / 2: the number sklearn's
    roc_auc_score gives (to rounding), about three times faster, which the bootstrap repeats n times."""
    ranks = rankdata(np.r_[id_s, ood_s])
    n_id, n_ood = len(id_s), len(ood_s)
    return float((ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * n_ood))


def _aupr_in(id_s: np.ndarray, ood_s: np.ndarray, positive: str = "id") -> float:
    """Average precision with ID positive."""
    return float(average_precision_score(np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]))


def _aupr_out(id_s: np.ndarray, ood_s: np.ndarray, positive: str = "id") -> float:
    """Average precision with OOD positive on negated scores."""
    return float(average_precision_score(np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))], -np.r_[id_s, ood_s]))


def _detection_error(id_s: np.ndarray, ood_s: np.ndarray, positive: str = "id") -> float:
    return detection_error(id_s, ood_s)  # symmetric in the two classes: the convention does not matter


@dataclass(frozen=True)
class Metric:
    """One metric: its record key ``name``, table ``label``, direction, display and kind.

    ``fn(id_scores, ood_scores, positive)`` computes an ``"ood"`` metric from validated float64 arrays
    (None for the other kinds). Calling the metric, ``METRICS["auroc"](id_scores, ood_scores)``,
    validates the scores first.
    """

    name: str
    label: str
    higher_is_better: bool
    kind: str
    percent: bool = True
    fn: Optional[Callable[[np.ndarray, np.ndarray, str], float]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric kind must be one of {KINDS}, got {self.kind!r}")
        if (self.fn is not None) != (self.kind == "ood"):
            raise ValueError(f"metric {self.name!r}: OOD metrics, and only they, carry a function")

    def __call__(self, id_scores, ood_scores, positive: str = "id") -> float:
        if self.fn is None:
            raise TypeError(f"{self.name!r} is not computed from ID/OOD scores")
        return self.fn(*_checked(id_scores, ood_scores, positive), positive)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fpr95", "FPR95", False, "ood", fn=_fpr95),
    Metric("auroc", "AUROC", True, "ood", fn=_auroc),
    Metric("aupr_in", "AUPR-In", True, "ood", fn=_aupr_in),
    Metric("aupr_out", "AUPR-Out", True, "ood", fn=_aupr_out),
    Metric("detection_error", "Det. error", False, "ood", fn=_detection_error),
    Metric("id_accuracy", "Accuracy", True, "quality"),
    Metric("id_nll", "NLL", False, "quality", percent=False),
    Metric("id_brier", "Brier", False, "quality", percent=False),
    Metric("id_ece", "ECE", False, "quality"),
    Metric("ood_accuracy", "Acc. on set", True, "shift"),
)}
OOD_METRICS = tuple(name for name, m in METRICS.items() if m.kind == "ood")
QUALITY_METRICS = tuple(name for name, m in METRICS.items() if m.kind == "quality")


def _checked(id_scores, ood_scores, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """The scores as flat float64 arrays; ValueError on an unknown convention, an empty side or non-finite scores."""
    if positive not in POSITIVES:
        raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
    id_s = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_s = np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(id_s) == 0 or len(ood_s) == 0:
        raise ValueError("OOD metrics need at least one ID and one OOD score")
    if not (np.isfinite(id_s).all() and np.isfinite(ood_s).all()):
        raise ValueError("OOD metrics got non-finite scores")
    return id_s, ood_s


def ood_metrics(id_scores, ood_scores, positive: str = "id") -> dict[str, float]:
    """Every OOD metric of the registry (FPR95, AUROC, AUPR-In, AUPR-Out, detection error) of one ID/OOD pair.

    ``positive="id"`` (default; mode-ensemble, ODIN, DICE, KNN papers): FPR95 is the
    fraction of OOD accepted when 95% of ID is kept. ``positive="ood"``
    (OpenOOD/SDDE): FPR95 is the fraction of ID rejected when 95% of OOD is caught.
    AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive on negated scores) and the
    detection error do not depend on the convention.
    """
    id_s, ood_s = _checked(id_scores, ood_scores, positive)
    return {name: METRICS[name].fn(id_s, ood_s, positive) for name in OOD_METRICS}
