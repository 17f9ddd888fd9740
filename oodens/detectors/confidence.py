"""Logit- and probability-space detectors beyond MSP/energy: GEN, KL matching, OpenMax.

GEN scores logits alone (a :class:`LogitDetector`: its ensemble averages logits or probabilities).
KL matching and OpenMax compare a sample with class templates fit on the ID-train logits (mean softmax
per predicted class; mean logit vector and a Weibull model of distances per class). Their ensemble is
``mean-scores``: a ``mean-logits`` ensemble would need templates fit on the members' *averaged* train
logits, but member strategies only see each member's own fitted detector, and no per-member summary
(templates, MAVs, Weibull fits) determines the averaged one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_softmax, logsumexp, softmax

from oodens.detectors.base import check_is_fitted, param, register_detector
from oodens.detectors.logit import LogitDetector, fitted_logits, kept_classes
from oodens.errors import OodensError
from oodens.views.types import Views

TINY = np.finfo(np.float64).tiny


def complement(p: np.ndarray) -> np.ndarray:
    """``1 - p`` of each probability; each row's largest as the sum of the row's others, so that a
    probability within rounding of 1 keeps its (tiny) complement instead of cancelling to 0."""
    q = 1.0 - p
    top = p.argmax(axis=1)
    rows = np.arange(len(p))
    others = p.copy()
    others[rows, top] = 0.0
    q[rows, top] = others.sum(axis=1)
    return q


def groups(keys: np.ndarray, n: int) -> list[np.ndarray]:
    """The sample indices with each key ``0..n-1`` (in sample order; empty where a key never occurs)."""
    order = np.argsort(keys, kind="stable")
    return np.split(order, np.searchsorted(keys[order], np.arange(1, n)))


@register_detector
@dataclass
class GEN(LogitDetector):
    """GEN: ``-sum_{j in top-M} p_j^gamma (1 - p_j)^gamma``, p = softmax(z), over the M largest
    probabilities (M capped at the class count): the negative generalized entropy of the top of the
    predictive distribution.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
    CVPR 2023. gamma = 0.1, M = 100 (as OpenOOD v1.5). ``mean-probs`` scores the members' averaged
    probabilities.
    """

    name = "gen"
    strategies = ("mean-logits", "mean-probs", "mean-scores")
    gamma: float = param(0.1, "GEN exponent gamma")
    top_m: int = param(100, "M: how many of the largest probabilities are summed (capped at the class count)")

    def validate(self):
        self._check_positive("gamma")
        self._check_int("top_m", 1)
        return self

    def score_logits(self, z):
        p = softmax(z, axis=1)
        g = p**self.gamma * complement(p) ** self.gamma
        m = min(self.top_m, p.shape[1])
        if m < p.shape[1]:  # the top-M probabilities (ties at the M-th have equal terms: any of them)
            g = np.take_along_axis(g, np.argpartition(-p, m - 1, axis=1)[:, :m], axis=1)
        return -g.sum(axis=1)


@dataclass
class TemplateDetector(LogitDetector):
    """Compares a sample's logits with class templates that ``fit`` learns from the ID-train logits."""

    family = "logit-templates"
    needs_fit = True
    strategies = ("mean-scores",)

    def member_logits(self, views):
        check_is_fitted(self)
        self.validate()
        return np.asarray(fitted_logits(self, views, self.n_logits_in_)[0], dtype=np.float64)

    def score(self, views):
        """The score of each sample; on a class-masked set (``views.kept``) against the kept classes' templates."""
        z = self.member_logits(views)
        return self.score_logits(z, kept_classes(self, views, self.n_logits_in_))


@register_detector
@dataclass
class KLMatching(TemplateDetector):
    """KL matching: ``-min_c KL(softmax(z) || d_c)``, d_c the mean softmax of the ID-train samples
    *predicted* as class c (labels unused); classes no training sample is predicted as have no template
    (OpenOOD v1.5 gives them a one-hot template, whose KL is infinite for any softmax: the same minimum).

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling Out-of-Distribution
    Detection for Real-World Settings", ICML 2022. No hyperparameters. The paper (and OpenOOD) fit the
    templates on held-out ID validation data; oodens fits them on the ID-train views like every other
    detector's statistics. Templates are floored at the smallest positive float so the KL stays finite.

    Class-masked set (ImageNet-A/R; ``views.kept``): p = softmax(z[kept]) against the templates of the kept
    classes (those with one), each restricted to the kept columns and renormalised (floored first): the template
    conditioned on the kept classes, as softmax(z[kept]) is softmax(z) conditioned on them. oodens' choice (the
    paper and OpenOOD define nothing for masked sets); refitting on the restricted train softmaxes would need
    the ID-train logits, which fit does not keep.

    Learned by ``fit``: ``templates_`` (K, C), ``template_classes_`` (the K predicted classes, logit
    columns), ``n_logits_in_``.
    """

    name = "klm"

    def fit(self, train: Views) -> "KLMatching":
        self.validate()
        z = np.asarray(self._matrix(train, "logits"), dtype=np.float64)
        p = softmax(z, axis=1)
        by_class = groups(z.argmax(axis=1), z.shape[1])
        self.template_classes_ = np.array([c for c, idx in enumerate(by_class) if len(idx)])
        self.templates_ = np.stack([p[by_class[c]].mean(axis=0) for c in self.template_classes_])
        self.n_logits_in_ = z.shape[1]
        return self

    def log_templates(self, kept: np.ndarray | None = None) -> np.ndarray:
        """(K, C) log templates (floored); with ``kept`` the (K', len(kept)) ones of the kept classes that have a
        template, each restricted to the kept columns and renormalised."""
        log_t = np.log(np.maximum(self.templates_, TINY))
        if kept is None:
            return log_t
        rows = np.flatnonzero(np.isin(self.template_classes_, kept))
        if not len(rows):
            raise OodensError(f"klm has no template for any of the {len(kept)} kept classes of this class-masked set "
                              "(no ID-train sample is predicted as one of them): expected kept classes the network "
                              "predicts")
        log_t = log_t[np.ix_(rows, kept)]
        return log_t - logsumexp(log_t, axis=1, keepdims=True)

    def score_logits(self, z, kept=None):
        log_p = log_softmax(z, axis=1)
        p = np.exp(log_p)
        # KL(p || d) = sum_j p_j log p_j - sum_j p_j log d_j, every template at once
        kl = np.sum(p * log_p, axis=1)[:, None] - p @ self.log_templates(kept).T
        return -kl.min(axis=1)


#: libMR's FitHigh shifts the tail so that its smallest distance sits at this value before the fit
LIBMR_TRANSLATION = 10000.0


def eucos(v: np.ndarray, mav: np.ndarray, eu_weight: float) -> np.ndarray:
    """``eu_weight * ||v - mav|| + (1 - cos(v, mav))`` row by row (``mav`` one row or one per row of v)."""
    v, mav = np.broadcast_arrays(v, mav)
    norms = np.linalg.norm(v, axis=1) * np.linalg.norm(mav, axis=1)
    cos = np.einsum("ij,ij->i", v, mav) / np.maximum(norms, TINY)
    return eu_weight * np.linalg.norm(v - mav, axis=1) + (1.0 - cos)


@dataclass(frozen=True)
class TailWeibull:
    """A Weibull fit of the largest distances as libMR's FitHigh makes it: the tail x_i shifted to
    ``t_i = x_i - min(x) + T`` (T = :data:`LIBMR_TRANSLATION`), then the two-parameter (location 0)
    maximum-likelihood Weibull of the t_i. ``cdf(x) = 1 - exp(-(t / scale)^shape)``, t = x - min + T,
    is the W-score. Kept in logs around T so that the fit does not lose the tail's spread to rounding:
    ``log_scale = log(scale / T)``."""

    tail_min: float | np.ndarray
    shape: float | np.ndarray
    log_scale: float | np.ndarray

    @classmethod
    def fit(cls, tail: np.ndarray) -> "TailWeibull":
        tail = np.asarray(tail, dtype=np.float64)
        m = float(tail.min())
        log_t = np.log1p((tail - m) / LIBMR_TRANSLATION)  # log(t_i / T)
        a = log_t - log_t.mean()
        if not a.max() > 0:
            raise ValueError("the tail distances are all equal")

        def likelihood_equation(k: float) -> float:
            # d/dk of the profile log-likelihood (scale at its optimum for k), over n; increasing in k
            return float(softmax(k * a) @ a) - 1.0 / k

        lo = 0.5 / a.max()  # there the equation is <= max(a) - 2 max(a) < 0
        hi = 2.0 * lo
        while likelihood_equation(hi) <= 0:
            hi *= 2.0
        k = brentq(likelihood_equation, lo, hi, xtol=TINY, rtol=4 * np.finfo(np.float64).eps, maxiter=1000)
        log_scale = log_t.mean() + (logsumexp(k * a) - np.log(len(a))) / k
        return cls(m, float(k), float(log_scale))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", over="ignore"):
            log_t = np.log1p(np.maximum((np.asarray(x, dtype=np.float64) - self.tail_min) / LIBMR_TRANSLATION, -1.0))
            return -np.expm1(-np.exp(self.shape * (log_t - self.log_scale)))


@register_detector
@dataclass
class OpenMax(TemplateDetector):
    """OpenMax: the unknown-class probability of the OpenMax layer, negated (higher = more ID).

    Fit: for each class c, the mean activation vector mu_c (mean logit vector) of the ID-train samples
    correctly classified as c, their distances d = eucos(z, mu_c) = eu_weight ||z - mu_c|| +
    (1 - cos(z, mu_c)), and a Weibull fit (:class:`TailWeibull`, libMR's FitHigh) of the ``tailsize``
    largest. Score of logits v: the top ``alpha`` classes by logit (rank r = 1..alpha) are revised,
    ``v_hat_c = v_c (1 - omega_r w_c)`` with ``omega_r = (alpha + 1 - r) / alpha`` and w_c the W-score of
    eucos(v, mu_c); the unknown class gets ``v_hat_0 = sum_c (v_c - v_hat_c)``, and the score is
    ``-P(unknown) = -exp(v_hat_0) / (exp(v_hat_0) + sum_c exp(v_hat_c))``.

    Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016. Defaults from the authors' code
    (OSDN): tailsize = 20, alpha = 10 (capped at the class count), eucos with eu_weight = 1/200. OpenOOD
    v1.5 differs: alpha = 3 and the plain Euclidean distance (its calls pass ``'euclidean'``); oodens
    follows the authors. The paper's Algorithm 2 prints the rank weights as (alpha - r) / alpha, which
    never revises the alpha-th class; both codes use (alpha + 1 - r) / alpha, as here. Weibull fit:
    libMR shifts the tail to start at 10000 and fits a location-0 Weibull by maximum likelihood; oodens
    solves that likelihood equation exactly (brentq) instead of libMR's iterations.

    Class-masked set (ImageNet-A/R; ``views.kept``): the kept logits v = z[kept] are revised with the kept
    classes' MAVs restricted to the kept columns (``mavs_[kept][:, kept]``) and the kept classes' Weibull fits as
    fitted (alpha capped at the kept count). oodens' choice (the paper and OpenOOD define nothing for masked sets),
    and an approximation: those Weibulls model eucos distances of full-width logit vectors, while a masked sample's
    distance is over the kept columns; an exact refit would need the ID-train logits, which fit does not keep.

    Learned by ``fit``: ``mavs_`` (C, C), ``tail_min_``, ``shape_``, ``log_scale_`` (per class, the
    Weibull fits), ``n_logits_in_``. Needs ID-train labels (``Views.classes`` maps a leave-out member's
    logit columns to them) and at least two distinct distances among each class's correctly classified
    training samples.
    """

    name = "openmax"
    tailsize: int = param(20, "how many of each class's largest training distances the Weibull is fit on")
    alpha: int = param(10, "how many top-ranked classes are revised (capped at the class count)")
    eu_weight: float = param(0.005, "weight of the Euclidean part of the eucos distance (1/200)")

    def validate(self):
        self._check_int("tailsize", 2)
        self._check_int("alpha", 1)
        self._check_nonnegative("eu_weight")
        return self

    def fit(self, train: Views) -> "OpenMax":
        self.validate()
        z = np.asarray(self._matrix(train, "logits"), dtype=np.float64)
        labels = np.asarray(self._array(train, "labels"))
        columns = np.arange(z.shape[1]) if train.classes is None else np.asarray(train.classes)
        pred = z.argmax(axis=1)
        correct = columns[pred] == labels
        mavs, fits = [], []
        for c, idx in enumerate(groups(np.where(correct, pred + 1, 0), z.shape[1] + 1)[1:]):
            if len(idx) < 2:
                raise OodensError(f"openmax needs at least 2 correctly classified ID-train samples of each class: "
                                  f"class {columns[c]} (logit column {c}) has {len(idx)}")
            mavs.append(z[idx].mean(axis=0))
            d = eucos(z[idx], mavs[-1], self.eu_weight)
            try:
                fits.append(TailWeibull.fit(np.sort(d)[-self.tailsize:]))
            except ValueError:
                raise OodensError(f"openmax cannot fit a Weibull for class {columns[c]} (logit column {c}): its "
                                  f"correctly classified ID-train samples are all at the same distance from "
                                  f"their mean") from None
        self.mavs_ = np.stack(mavs)
        self.tail_min_ = np.array([f.tail_min for f in fits])
        self.shape_ = np.array([f.shape for f in fits])
        self.log_scale_ = np.array([f.log_scale for f in fits])
        self.n_logits_in_ = z.shape[1]
        return self

    def w_scores(self, v: np.ndarray, c: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
        """The W-score of each row of ``v`` under the Weibull of its class ``c[i]`` (a logit column of ``v``; with
        ``kept``, v holds the kept logits, c indexes them and the MAVs are restricted to the kept columns)."""
        cls = c if kept is None else kept[c]
        mavs = self.mavs_[cls] if kept is None else self.mavs_[np.ix_(cls, kept)]
        weibull = TailWeibull(self.tail_min_[cls], self.shape_[cls], self.log_scale_[cls])
        return weibull.cdf(eucos(v, mavs, self.eu_weight))

    def score_logits(self, z, kept=None):
        rows = np.arange(len(z))
        alpha = min(self.alpha, z.shape[1])
        ranked = np.argsort(-z, axis=1, kind="stable")[:, :alpha]
        revised, unknown = z.copy(), np.zeros(len(z))
        for r in range(alpha):
            c = ranked[:, r]
            cut = z[rows, c] * (alpha - r) / alpha * self.w_scores(z, c, kept)
            revised[rows, c] -= cut
            unknown += cut
        return -np.exp(unknown - logsumexp(np.column_stack([revised, unknown]), axis=1))
