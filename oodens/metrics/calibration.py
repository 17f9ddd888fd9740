"""ID quality and calibration (DESIGN.md section 7): accuracy, NLL, Brier, ECE, temperature scaling.

All take class probabilities (n, C) and integer labels; ensembles pass the mean of the
members' softmax probabilities (the deep-ensemble predictive distribution).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

ECE_BINS = 15


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, np.finfo(np.float64).tiny))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of sum_c (p_c - [y = c])^2."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[labels]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins (0, 1/B], ..., ((B-1)/B, 1]:
    sum_b (n_b / n) |acc_b - conf_b|."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per bin: (mean confidence, accuracy, count), for reliability diagrams."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        out.append((float(conf[m].mean()) if m.any() else np.nan, float(correct[m].mean()) if m.any() else np.nan,
                    int(m.sum())))
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(z / T) (bounded scalar search on log T)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    def loss(log_t):
        return -np.mean(log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y])

    res = minimize_scalar(loss, bounds=(np.log(1e-2), np.log(1e2)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def quality(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, nll, brier, ece of one predictive distribution."""
    return {
        "accuracy": float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(labels))),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
    }


def probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
