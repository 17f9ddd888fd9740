"""Weight- and activation-shaping detectors: each member shapes its own logits from its
cached features and final layer, then the energy is taken. Default ensemble strategy:
``mean-logits`` of the members' shaped logits.

Two kinds: shaping learned from the ID-train features (DICE, ReAct, ReAct+DICE, VRA: ``fit``), and
shaping of each sample on its own (the ASH family and SCALE: keep each sample's top activations,
no fit). The per-sample kind shares one top-k rule (:func:`top_k_mask`): keep the
``D - round(D p / 100)`` largest activations of each sample, ties to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from oodens.detectors.base import check_is_fitted, param, register_detector
from oodens.detectors.logit import LogitDetector, kept_classes
from oodens.errors import OodensError, ParameterError
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

    def _fitted_head(self, views: Views) -> tuple[np.ndarray, np.ndarray]:
        """The head shaped by ``fit`` (``weight_``, ``bias_``) for the classes of ``views``: all its rows, or on a
        class-masked set (ImageNet-R: 200 of 1000 classes; ``views.kept``) the kept classes' rows, each with the
        mask fit gave it. Views of fewer classes that do not say which (no ``kept``) are refused: scoring them
        with all the fitted rows would read classes the set left out."""
        kept = kept_classes(self, views, self.weight_.shape[0])
        if kept is not None:
            return self.weight_[kept], self.bias_[kept]
        w = getattr(views, "weight", None)
        if w is not None and np.shape(w)[0] != self.weight_.shape[0]:
            raise OodensError(f"{self.name} shaped a {self.weight_.shape[0]}-class head in fit, but these views hold "
                              f"{np.shape(w)[0]} classes and do not say which (views.kept, set by mask_views on a "
                              f"class-masked set): expected views of every class or class-masked views")
        return self.weight_, self.bias_


# --------------------------------------------------------------------------- shaping learned from ID-train features


def dice_mask(feature_mean: np.ndarray, weight: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """DICE's sparsification mask ``M = [f_bar * W > percentile_p(f_bar * W)]`` over all C x D entries."""
    contrib = np.asarray(feature_mean, dtype=np.float64)[None, :] * np.asarray(weight, dtype=np.float64)
    threshold = float(np.percentile(contrib, p))
    return contrib > threshold, threshold


def react_threshold(features: np.ndarray, p: float) -> float:
    """ReAct's clipping threshold: the p-th percentile of all ID-train activations (every sample and unit)."""
    return float(np.percentile(np.asarray(features, dtype=np.float64), p))


@register_detector
@dataclass
class DICE(ShapingDetector):
    """DICE: energy of ``h (W * M)^T + b``, M keeping the weights whose contribution
    ``f_bar * W`` (f_bar = mean ID-train feature) is above its p-th percentile.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection",
    ECCV 2022. p = 90 (CIFAR), 70 (ImageNet).

    Class-masked set (ImageNet-A/R; ``views.kept``): the kept classes' rows of the sparsified head, ``(W * M)[kept]``
    and ``b[kept]``: M is per weight entry, so each kept row keeps the mask fit gave it (the percentile over all
    C x D contributions is not recomputed over the kept rows). oodens' choice: the DICE paper and OpenOOD define
    nothing for masked sets.

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
        w, b = self._fitted_head(views)
        return np.asarray(h, dtype=np.float64) @ w.T + b


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
        self.clip_ = react_threshold(feats, self.p)
        self.n_features_in_ = feats.shape[1]
        return self

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        h = np.minimum(np.asarray(self._matrix(views, "features", self.n_features_in_), dtype=np.float64), self.clip_)
        w, b = self._head(views, h.shape[1])
        return h @ w.T + b


@register_detector
@dataclass
class ReActDICE(ShapingDetector):
    """ReAct + DICE: energy of ``min(h, c) (W * M)^T + b``: ReAct's clipping (c the ``react_p``-th
    percentile of all ID-train activations), then DICE's sparsified head (M keeps the weights whose
    contribution ``f_bar * W`` is above its p-th percentile, f_bar the mean *unclipped* ID-train feature).

    The combination reported in Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution
    Detection", ECCV 2022 (its "DICE + ReAct" rows, ImageNet). Defaults from the DICE authors' ImageNet
    script for that combination: p = 10 (DICE alone uses 70 on ImageNet: with ReAct far fewer weights are
    pruned) and ReAct's c = 1.0, which is ReAct's 90th percentile on ResNet-50 (react_p = 90). As in that
    code, f_bar is the mean of the unclipped features. OpenOOD v1.5 has no such combination.

    Class-masked set (ImageNet-A/R; ``views.kept``): as dice, the kept rows ``(W * M)[kept]``, ``b[kept]`` (masks as
    fitted over all C x D contributions) with the same clip c (oodens' choice).

    Learned by ``fit``: ``clip_`` (c), ``mask_`` and ``threshold_`` (DICE's), ``weight_`` = W * M and
    ``bias_`` (the training views' final layer, which scoring uses), ``n_features_in_``.
    """

    name = "react-dice"
    needs_fit = True
    p: float = param(10.0, "DICE sparsity percentile p (of the contributions f_bar * W)")
    react_p: float = param(90.0, "ReAct clipping percentile (of all ID-train activations)")

    def validate(self):
        self._check_percentile("p")
        self._check_percentile("react_p")
        return self

    def fit(self, train: Views) -> "ReActDICE":
        self.validate()
        feats = np.asarray(self._matrix(train, "features"), dtype=np.float64)
        w, b = self._head(train, feats.shape[1])
        self.clip_ = react_threshold(feats, self.react_p)
        self.mask_, self.threshold_ = dice_mask(feats.mean(axis=0), w, self.p)
        self.weight_, self.bias_ = w * self.mask_, b
        self.n_features_in_ = feats.shape[1]
        return self

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        h = np.asarray(self._matrix(views, "features", self.n_features_in_), dtype=np.float64)
        w, b = self._fitted_head(views)
        return np.minimum(h, self.clip_) @ w.T + b


def vra(h: np.ndarray, low: np.ndarray, high: np.ndarray, gamma: float) -> np.ndarray:
    """VRA(+) on each activation: 0 below ``low``, ``h + gamma`` in [low, high], ``high`` above."""
    h = np.asarray(h, dtype=np.float64)
    return np.where(h < low, 0.0, np.where(h > high, high, h + gamma))


@register_detector
@dataclass
class VRA(ShapingDetector):
    """VRA: energy of ``g(h) W^T + b`` with, per unit d, ``g(h_d) = 0`` if ``h_d < alpha_d``,
    ``h_d + gamma`` if ``alpha_d <= h_d <= beta_d``, ``beta_d`` if ``h_d > beta_d``: abnormally low
    activations suppressed, high ones clipped (ReAct's side), intermediate ones amplified by gamma.
    alpha_d and beta_d are the ``p_low``-th and ``p_high``-th percentiles of unit d over the ID-train
    features. gamma = 0 is VRA, gamma > 0 is VRA+.

    Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution Detection",
    NeurIPS 2023. Defaults: VRA on CIFAR-10 in the authors' code, per-unit quantiles 0.6 and 0.9 of the
    training features, gamma = 0 (their VRA+ on CIFAR: 0.6, 0.95, gamma = 0.6; the paper searches
    alpha's quantile in {0.5, 0.6, 0.65, 0.7}, beta's in {0.8, ..., 0.99}, gamma in {0.2, ..., 0.7}).
    OpenOOD v1.5 differs: one pair of percentiles (10, 90) over all activations, and it clips low
    activations *up to* the low threshold instead of zeroing them; oodens follows the paper's function.

    Learned by ``fit``: ``low_`` and ``high_`` (per-unit thresholds, shape (D,)), ``n_features_in_``.
    """

    name = "vra"
    needs_fit = True
    p_low: float = param(60.0, "percentile (per unit, ID-train) below which activations are zeroed (alpha)")
    p_high: float = param(90.0, "percentile (per unit, ID-train) above which activations are clipped (beta)")
    gamma: float = param(0.0, "amplification of the activations between the thresholds (0 = VRA, > 0 = VRA+)")

    def validate(self):
        self._check_percentile("p_low")
        self._check_percentile("p_high")
        self._check_nonnegative("gamma")
        if self.p_low >= self.p_high:
            raise self._param_error("p_low", f"is out of range: expected p_low < p_high = {self.p_high:g}")
        return self

    def fit(self, train: Views) -> "VRA":
        self.validate()
        feats = np.asarray(self._matrix(train, "features"), dtype=np.float64)
        self.low_, self.high_ = np.percentile(feats, [self.p_low, self.p_high], axis=0)
        self.n_features_in_ = feats.shape[1]
        return self

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        h = vra(self._matrix(views, "features", self.n_features_in_), self.low_, self.high_, self.gamma)
        w, b = self._head(views, h.shape[1])
        return h @ w.T + b


# --------------------------------------------------------------------------- per-sample shaping (no fit)


def top_k_mask(h: np.ndarray, p: float, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """``(h as float64, mask)``: the mask keeps the top ``D - round(D p / 100)`` activations of each row
    (ties broken towards the lower index, so the kept set never depends on a sort kernel).
    ``owner`` names the detector in the error when ``p`` would prune every feature."""
    h = np.asarray(h, dtype=np.float64)
    d = h.shape[1]
    keep = d - int(np.round(d * p / 100.0))
    if keep <= 0:
        raise ParameterError(owner, "p", p, f"prunes every feature: expected p < {100 * (d - 0.5) / d:.2f} for D = {d}")
    kth = -np.partition(-h, keep - 1, axis=1)[:, keep - 1 : keep]  # each row's keep-th largest value
    above, tied = h > kth, h == kth
    wanted = keep - above.sum(axis=1, keepdims=True)  # how many of the values equal to it are kept
    return h, above | (tied & (np.cumsum(tied, axis=1) <= wanted))


def _sharpening(h: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """ASH-S's factor ``exp(sum before / sum after pruning)`` of each row, as a column."""
    s1, s2 = h.sum(axis=1), pruned.sum(axis=1)
    return np.exp(s1 / np.where(s2 == 0, 1.0, s2))[:, None]


def ash_p(h: np.ndarray, p: float, owner: str = "ash-p") -> np.ndarray:
    """ASH-P on each row: keep the top D - round(D p / 100) values, zero the rest."""
    h, keep = top_k_mask(h, p, owner)
    return np.where(keep, h, 0.0)


def ash_b(h: np.ndarray, p: float, owner: str = "ash-b") -> np.ndarray:
    """ASH-B on each row: the kept positions (top D - round(D p / 100)) all set to sum(row) / kept, the
    rest zero."""
    h, keep = top_k_mask(h, p, owner)
    return keep * (h.sum(axis=1) / keep.sum(axis=1))[:, None]


def ash_s(h: np.ndarray, p: float, owner: str = "ash") -> np.ndarray:
    """ASH-S on each row: keep the top D - round(D p / 100) values, zero the rest,
    scale by exp(sum before / sum after)."""
    h, keep = top_k_mask(h, p, owner)
    pruned = np.where(keep, h, 0.0)
    return pruned * _sharpening(h, pruned)


def scale(h: np.ndarray, p: float, owner: str = "scale") -> np.ndarray:
    """SCALE on each row: every value (nothing pruned) scaled by ASH-S's exp(sum / sum of the top
    D - round(D p / 100) values)."""
    h, keep = top_k_mask(h, p, owner)
    return h * _sharpening(h, np.where(keep, h, 0.0))


@dataclass
class SampleShaping(ShapingDetector):
    """Shapes each sample's features on its own (its top activations, no ID statistics, no fit): energy
    of ``shape(h) W^T + b``."""

    def shape(self, h: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def member_logits(self, views):
        self.validate()
        h = self.shape(self._matrix(views, "features"))
        w, b = self._head(views, h.shape[1])
        return h @ w.T + b


@register_detector
@dataclass
class ASH(SampleShaping):
    """ASH-S: energy of ``ash_s(h) W^T + b`` (keep the top (100 - p)% activations of each
    sample, zero the rest, rescale by exp(sum before / sum after)).

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023. p = 90.
    """

    name = "ash"
    p: float = param(90.0, "ASH-S pruning percentile p")

    def shape(self, h):
        return ash_s(h, self.p, self.name)


@register_detector
@dataclass
class ASHP(SampleShaping):
    """ASH-P: energy of ``ash_p(h) W^T + b``: keep the top D - round(D p / 100) activations of each
    sample, zero the rest (pruning only).

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
    ICLR 2023. p = 60, the paper's ASH-P setting on ImageNet (ResNet-50); OpenOOD v1.5 has no ASH-P.
    """

    name = "ash-p"
    p: float = param(60.0, "ASH-P pruning percentile p")

    def shape(self, h):
        return ash_p(h, self.p, self.name)


@register_detector
@dataclass
class ASHB(SampleShaping):
    """ASH-B: energy of ``ash_b(h) W^T + b``: keep the top k = D - round(D p / 100) activations of each
    sample and set each kept one to ``sum(h) / k`` (the sample's total, spread evenly), zero the rest.

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
    ICLR 2023. p = 65, the paper's ASH-B setting on ImageNet (ResNet-50). OpenOOD v1.5's "ash" is this
    variant at p = 90 on every benchmark; oodens follows the paper. Ties at the k-th value go to the lower
    unit index (OpenOOD: whichever ``torch.topk`` returns).
    """

    name = "ash-b"
    p: float = param(65.0, "ASH-B pruning percentile p")

    def shape(self, h):
        return ash_b(h, self.p, self.name)


@register_detector
@dataclass
class Scale(SampleShaping):
    """SCALE: energy of ``h exp(s1 / s2) W^T + b``: ASH-S's sharpening factor without its pruning,
    s1 = sum of the sample's activations, s2 = sum of its top D - round(D p / 100) activations.

    Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024. p = 85 (as OpenOOD v1.5).
    """

    name = "scale"
    p: float = param(85.0, "SCALE percentile p (the top (100 - p)% activations give the factor)")

    def shape(self, h):
        return scale(h, self.p, self.name)
