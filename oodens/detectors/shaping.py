"""Weight- and activation-shaping detectors: each member shapes its own logits from its
cached features and final layer, then the energy is taken. Default ensemble strategy:
``mean-logits`` of the members' shaped logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from oodens.detectors.base import param, register_detector
from oodens.detectors.logit import LogitDetector
from oodens.errors import OodensError
from oodens.views import Views


@dataclass
class ShapingDetector(LogitDetector):
    family = "shaping"
    needs = ("features", "weight", "bias")
    strategies = ("mean-logits", "mean-scores")

    def score_logits(self, z):
        return logsumexp(z, axis=1)


def _check_percentile(flag: str, p: float) -> None:
    if not 0 <= p < 100:
        raise OodensError(f"{flag} {p} is out of range: expected a percentile in [0, 100)")


def dice_mask(feature_mean: np.ndarray, weight: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """DICE's sparsification mask ``M = [f_bar * W > percentile_p(f_bar * W)]`` over all C x D entries."""
    contrib = np.asarray(feature_mean, dtype=np.float64)[None, :] * np.asarray(weight, dtype=np.float64)
    threshold = float(np.percentile(contrib, p))
    return contrib > threshold, threshold


@register_detector
@dataclass
class DICE(ShapingDetector):
    """DICE: energy of ``h (W * M)^T + b``, M keeping the weights whose contribution
    ``f_bar * W`` (f_bar = mean ID-train feature) is above its p-th percentile.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection",
    ECCV 2022. p = 90 (CIFAR), 70 (ImageNet).
    """

    name = "dice"
    needs_fit = True
    p: float = param(90.0, "DICE sparsity percentile p")
    _weight: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _bias: np.ndarray = field(default=None, init=False, repr=False, compare=False)

    def fit(self, train: Views) -> "DICE":
        _check_percentile("--dice-p", self.p)
        mean = np.asarray(train.features, dtype=np.float64).mean(axis=0)
        mask, _ = dice_mask(mean, train.weight, self.p)
        self._weight = np.asarray(train.weight, dtype=np.float64) * mask
        self._bias = np.asarray(train.bias, dtype=np.float64)
        return self

    def member_logits(self, views):
        return np.asarray(views.features, dtype=np.float64) @ self._weight.T + self._bias


@register_detector
@dataclass
class ReAct(ShapingDetector):
    """ReAct: energy of ``min(h, c) W^T + b``, c the p-th percentile of all ID-train activations.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021. p = 90.
    """

    name = "react"
    needs_fit = True
    p: float = param(90.0, "ReAct clipping percentile p")
    _clip: float = field(default=None, init=False, repr=False, compare=False)

    def fit(self, train: Views) -> "ReAct":
        _check_percentile("--react-p", self.p)
        self._clip = float(np.percentile(np.asarray(train.features, dtype=np.float64), self.p))
        return self

    def member_logits(self, views):
        h = np.minimum(np.asarray(views.features, dtype=np.float64), self._clip)
        return h @ np.asarray(views.weight, dtype=np.float64).T + np.asarray(views.bias, dtype=np.float64)


def ash_s(h: np.ndarray, p: float) -> np.ndarray:
    """ASH-S on each row: keep the top D - round(D p / 100) values, zero the rest,
    scale by exp(sum before / sum after)."""
    h = np.asarray(h, dtype=np.float64)
    d = h.shape[1]
    keep = d - int(np.round(d * p / 100.0))
    if keep <= 0:
        raise OodensError(f"--ash-p {p} prunes every feature: expected p < {100 * (d - 0.5) / d:.2f} for D = {d}")
    idx = np.argpartition(-h, keep - 1, axis=1)[:, :keep]
    pruned = np.zeros_like(h)
    np.put_along_axis(pruned, idx, np.take_along_axis(h, idx, axis=1), axis=1)
    s1, s2 = h.sum(axis=1), pruned.sum(axis=1)
    return pruned * np.exp(s1 / np.where(s2 == 0, 1.0, s2))[:, None]


@register_detector
@dataclass
class ASH(ShapingDetector):
    """ASH-S: energy of ``ash_s(h) W^T + b`` (keep the top (100 - p)% activations of each
    sample, zero the rest, rescale by exp(sum before / sum after)).

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023. p = 90.
    """

    name = "ash"
    p: float = param(90.0, "ASH-S pruning percentile p")

    def member_logits(self, views):
        h = ash_s(views.features, self.p)
        return h @ np.asarray(views.weight, dtype=np.float64).T + np.asarray(views.bias, dtype=np.float64)
