"""OOD detection metrics (DESIGN.md section 7) and ID accuracy.

Scores follow one convention everywhere: higher = more in-distribution.
All values are fractions in [0, 1]; tables show them as percentages.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error")
POSITIVES = ("id", "ood")


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


def ood_metrics(id_scores, ood_scores, positive: str = "id") -> dict[str, float]:
    """FPR95, AUROC, AUPR-In, AUPR-Out and detection error of one ID/OOD pair.

    ``positive="id"`` (default; mode-ensemble, ODIN, DICE, KNN papers): FPR95 is the
    fraction of OOD accepted when 95% of ID is kept. ``positive="ood"``
    (OpenOOD/SDDE): FPR95 is the fraction of ID rejected when 95% of OOD is caught.
    AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive on negated scores) and the
    detection error do not depend on the convention.
    """
    if positive not in POSITIVES:
        raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
    id_s = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_s = np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(id_s) == 0 or len(ood_s) == 0:
        raise ValueError("ood_metrics needs at least one ID and one OOD score")
    if not (np.isfinite(id_s).all() and np.isfinite(ood_s).all()):
        raise ValueError("ood_metrics got non-finite scores")
    y_id = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    if positive == "id":
        fpr95 = fpr_at_95_tpr(id_s, ood_s)
    else:
        fpr95 = fpr_at_95_tpr(-ood_s, -id_s)
    return {
        "fpr95": fpr95,
        "auroc": float(roc_auc_score(y_id, s)),
        "aupr_in": float(average_precision_score(y_id, s)),
        "aupr_out": float(average_precision_score(1 - y_id, -s)),
        "detection_error": detection_error(id_s, ood_s),
    }


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of argmax logits (or probabilities)."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
