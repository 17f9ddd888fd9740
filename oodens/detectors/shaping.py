"""Weight- and activation-shaping detectors: each member shapes its own logits from its
cached features and final layer, then the energy is taken. Default ensemble strategy:
``mean-logits`` of the members' shaped logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from oodens.detectors.base import check_is_fitted, param, register_detector
from oodens.detectors.logit import LogitDetector
from oodens.errors import ParameterError
from oodens.views.types import Views


@dataclass
class ShapingDetector(LogitDetector):
    """Shapes each member's features or head by a percentile ``p`` of something, then scores energy."""

    family = "shaping"
    needs = ("features", "weight", "bias")
    strategies = ("mean-logits", "mean-scores")

    def validate(self):
        self._check_percentile("p")
        return self

    def score_logits(self, z):
        return logsumexp(z, axis=1)


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

    Learned by ``fit``: ``mask_`` (C, D) and ``threshold_`` (the percentile), ``weight_`` = W * M
    and ``bias_`` (the training views' final layer, which scoring uses), ``n_features_in_``.
    """

    name = "dice"
    needs_fit = True
    p: float = param(90.0, "DICE sparsity percentile p")

    def fit(self, train: Views) -> "DICE":
        self.validate()
        feats = self._matrix(train, "features")
        w, b = self._head(train, feats.shape[1])
        mask, threshold = dice_mask(np.asarray(feats, dtype=np.float64).mean(axis=0), w, self.p)
        self.mask_, self.threshold_ = mask, threshold
        self.weight_, self.bias_ = w * mask, b
        self.n_features_in_ = feats.shape[1]
        return self

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        h = self._matrix(views, "features", self.n_features_in_)
        return np.asarray(h, dtype=np.float64) @ self.weight_.T + self.bias_


@register_detector
@dataclass
class ReAct(ShapingDetector):
    """ReAct: energy of ``min(h, c) W^T + b``, c the p-th percentile of all ID-train activations.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021. p = 90.

    Learned by ``fit``: ``clip_`` (the threshold c), ``n_features_in_``.
    """

    name = "react"
    needs_fit = True
    p: float = param(90.0, "ReAct clipping percentile p")

    def fit(self, train: Views) -> "ReAct":
        self.validate()
        feats = self._matrix(train, "features")
        self.clip_ = float(np.percentile(np.asarray(feats, dtype=np.float64), self.p))
        self.n_features_in_ = feats.shape[1]
        return self

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        h = np.minimum(np.asarray(self._matrix(views, "features", self.n_features_in_), dtype=np.float64), self.clip_)
        w, b = self._head(views, h.shape[1])
        return h @ w.T + b


def ash_s(h: np.ndarray, p: float) -> np.ndarray:
    """ASH-S on each row: keep the top D - round(D p / 100) values, zero the rest,
    scale by exp(sum before / sum after)."""
    h = np.asarray(h, dtype=np.float64)
    d = h.shape[1]
    keep = d - int(np.round(d * p / 100.0))
    if keep <= 0:
        raise ParameterError("ash", "p", p, f"prunes every feature: expected p < {100 * (d - 0.5) / d:.2f} for D = {d}")
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
        self.validate()
        h = ash_s(self._matrix(views, "features"), self.p)
        w, b = self._head(views, h.shape[1])
        return h @ w.T + b
