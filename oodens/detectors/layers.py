"""Detectors on views beyond the penultimate layer: the global-average-pooled maps (``layers`` view) and
the Gram-matrix features (``gram`` view) of the architecture's feature layers (its stage outputs, listed
once per architecture as ``feature_layers``, see :mod:`oodens.archs.stages`). Both views come out of the
same forward pass as the logits and features (:mod:`oodens.views.kinds`).

Both detectors fit on the ID training split; their ensemble strategy is ``mean-scores`` (the average of
the members' scores, each member fitted on its own views).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from oodens.detectors.base import Detector, _is_real, check_is_fitted, param, register_detector
from oodens.detectors.feature import CHUNK, Mahalanobis
from oodens.detectors.logit import fitted_logits
from oodens.errors import OodensError
from oodens.views.types import Views, ViewSpec

#: the seed of the held-out part of the ID training split (gram's deviation normaliser)
HOLDOUT_SEED = 0


@dataclass
class LayerDetector(Detector):
    family = "layers"
    needs_fit = True
    strategies = ("mean-scores",)

    def _layers(self, views: Views, fitted: list[tuple[int, ...]] | None = None) -> list[np.ndarray]:
        """The arrays of the detector's view, one per feature layer in forward order, their shapes (beyond
        the sample axis) checked against ``fitted`` (what fit saw)."""
        spec = self.view_specs()[0]
        arrays = self._extra(views, spec)
        if not isinstance(arrays, dict) or not arrays:
            raise OodensError(f"{self.name} reads the {spec.id} view, one array per feature layer "
                              f"(views.extra[{spec.id!r}] = {{'layer00': ..., 'layer01': ...}}), but got "
                              f"{type(arrays).__name__}")
        layers = [arrays[k] for k in sorted(arrays)]
        shapes = [tuple(a.shape[1:]) for a in layers]
        if fitted is not None and shapes != fitted:
            raise OodensError(f"{self.name} was fitted on feature layers of shapes {fitted} but got {shapes}")
        if len({len(a) for a in layers}) > 1:
            raise OodensError(f"{self.name}: the feature layers of these views hold different numbers of samples")
        return layers


@register_detector
@dataclass
class MultiLayerMahalanobis(LayerDetector):
    """Multi-layer Mahalanobis (feature ensemble): ``sum_l (M_l(x) - m_l) / s_l`` with
    ``M_l(x) = -min_c (f_l - mu_lc)^T S_l^+ (f_l - mu_lc)`` on f_l, the global-average-pooled map of
    feature layer l (class means mu_lc of ID train with true labels, shared covariance S_l divided by n,
    pseudo-inverse: the ``mahalanobis`` detector on each layer), and m_l, s_l the mean and standard
    deviation of M_l over the ID training samples.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (feature ensemble). The paper weighs the layers with a logistic regression
    fitted on validation OOD (or adversarial) samples and perturbs the input; this detector sees no OOD
    data and no gradients: it standardises each layer's score on ID train and sums them (equal weights),
    on the unperturbed input. The layers are the architecture's stage outputs (``feature_layers``).

    Class-masked set (ImageNet-A/R; ``views.kept``): each layer's minimum over the kept classes' means, as
    ``mahalanobis``; the standardisation as fitted.

    Learned by ``fit``: ``layers_`` (a fitted ``Mahalanobis`` per layer), ``mean_`` and ``std_`` (L,) of the
    per-layer ID-train scores, ``layer_shapes_``.
    """

    name = "mahalanobis-ml"
    needs = ("labels",)

    def view_specs(self):
        return [ViewSpec.of("layers")]

    def fit(self, train: Views) -> "MultiLayerMahalanobis":
        self.validate()
        layers = self._layers(train)
        y = self._array(train, "labels")
        fitted = [Mahalanobis().fit(Views(features=f, labels=y)) for f in layers]
        scores = np.stack([m.score(Views(features=f)) for m, f in zip(fitted, layers)])  # (L, n)
        std = scores.std(axis=1)
        self.layers_ = fitted
        self.mean_, self.std_ = scores.mean(axis=1), np.where(std > 0, std, 1.0)
        self.layer_shapes_ = [tuple(f.shape[1:]) for f in layers]
        return self

    def layer_scores(self, views: Views) -> np.ndarray:
        """(L, n): each layer's Mahalanobis score M_l, standardised on ID train."""
        check_is_fitted(self)
        self.validate()
        layers = self._layers(views, self.layer_shapes_)
        kept = getattr(views, "kept", None)  # a class-masked set: each layer's nearest kept class
        scores = np.stack([m.score(Views(features=f, kept=kept)) for m, f in zip(self.layers_, layers)])
        return (scores - self.mean_[:, None]) / self.std_[:, None]

    def score(self, views: Views) -> np.ndarray:
        return self.layer_scores(views).sum(axis=0)


@register_detector
@dataclass
class Gram(LayerDetector):
    """Gram matrices: ``-sum_l delta_l(x) / E_val[delta_l]``, with, for x predicted as class c (argmax of
    its logits) with confidence q = max softmax(z),
    ``delta_l(x) = (1/q) sum_p sum_i [relu(mn - g) / |mn + 1e-6| + relu(g - mx) / |mx + 1e-6|]``,
    g = g_{l,p,i}(x) the Gram feature of layer l, order p = 1..P, channel i (the row sums of the order-p
    Gram matrix F^p F^p^T, signed p-th root: the ``gram`` view), and [mn, mx] its minimum and maximum over
    the ID training samples predicted as c.

    Sastry & Oore, "Detecting Out-of-Distribution Examples with In-distribution Examples and Gram
    Matrices", ICML 2020 (deviations, 1/q and the normaliser as in the authors' code). P = 10. The
    paper normalises each layer's deviation by its mean on validation ID data drawn from the test set;
    here ``holdout`` (10%) of the ID training split is held out of the min/max (a seeded draw) and is
    that validation data; E_val gets the code's +1e-7. A class no fitting sample is predicted as gets
    the bounds over all of them. The layers are the architecture's stage outputs (``feature_layers``);
    the authors' code records every convolution and activation inside each block.

    Class-masked set (ImageNet-A/R; ``views.kept``): c = argmax and q = max softmax of the kept logits, against
    the kept classes' bounds (``mins_[l][kept]``, ``maxs_[l][kept]``); the normaliser E_val stays the full head's
    (fit's held-out deviations). oodens' choice (the paper and OpenOOD define nothing for masked sets).

    Learned by ``fit``: ``mins_`` and ``maxs_`` (per layer, (C, P, C_l)), ``norm_`` (L,) the mean held-out
    deviation per layer (+1e-7), ``n_logits_in_``, ``layer_shapes_``.
    """

    name = "gram"
    needs = ("logits",)
    orders: int = param(10, "highest Gram order P (orders 1..P)")
    holdout: float = param(0.1, "fraction of the ID training split held out of the min/max to normalise the "
                                "deviations")

    def validate(self):
        self._check_int("orders", 1)
        if not _is_real(self.holdout) or not 0 < self.holdout < 1:
            raise self._param_error("holdout", "is out of range: expected a fraction in (0, 1)")
        return self

    def validate_training_size(self, n: int) -> "Gram":
        if n < 2:
            raise self._param_error("holdout", f"needs at least 2 ID training samples, got {n}")
        return self

    def view_specs(self):
        return [ViewSpec.of("gram", orders=int(self.orders))]

    def _predictions(self, views: Views, fitted: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, max softmax probability) of each sample; on a class-masked set (``views.kept``) the
        argmax of its kept logits as a class of the full head, and their softmax's maximum."""
        if fitted is None:
            z, kept = self._matrix(views, "logits"), None
        else:
            z, kept = fitted_logits(self, views, fitted)
        z = np.asarray(z, dtype=np.float64)
        pred = z.argmax(axis=1)
        return pred if kept is None else kept[pred], softmax(z, axis=1).max(axis=1)

    def fit(self, train: Views) -> "Gram":
        self.validate()
        layers = self._layers(train)
        pred, conf = self._predictions(train)
        n, n_classes = len(pred), self._array(train, "logits").shape[1]
        self.validate_training_size(n)
        order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
        n_val = min(n - 1, max(1, round(self.holdout * n)))
        val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])
        mins, maxs = [], []
        for g in layers:
            mn = np.full((n_classes, *g.shape[1:]), np.inf)
            mx = np.full((n_classes, *g.shape[1:]), -np.inf)
            for s in range(0, len(rest), CHUNK):
                idx = rest[s : s + CHUNK]
                block = np.asarray(g[idx], dtype=np.float64)
                np.minimum.at(mn, pred[idx], block)
                np.maximum.at(mx, pred[idx], block)
            unseen = ~np.isfinite(mn[:, 0, 0])
            mn[unseen], mx[unseen] = mn[~unseen].min(axis=0), mx[~unseen].max(axis=0)
            mins.append(mn)
            maxs.append(mx)
        self.mins_, self.maxs_ = mins, maxs
        self.n_logits_in_ = n_classes
        self.layer_shapes_ = [tuple(g.shape[1:]) for g in layers]
        self.norm_ = self._deviations([g[val] for g in layers], pred[val], conf[val]).mean(axis=0) + 1e-7
        return self

    def _deviations(self, layers: list[np.ndarray], pred: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """(n, L): delta_l of each sample and layer, in blocks of samples."""
        out = np.empty((len(pred), len(layers)))
        for l, (g, mn, mx) in enumerate(zip(layers, self.mins_, self.maxs_)):
            for s in range(0, len(pred), CHUNK):
                block = np.asarray(g[s : s + CHUNK], dtype=np.float64)
                lo, hi = mn[pred[s : s + CHUNK]], mx[pred[s : s + CHUNK]]
                dev = np.maximum(lo - block, 0) / np.abs(lo + 1e-6) + np.maximum(block - hi, 0) / np.abs(hi + 1e-6)
                out[s : s + CHUNK, l] = dev.reshape(len(block), -1).sum(axis=1) / conf[s : s + CHUNK]
        return out

    def score(self, views: Views) -> np.ndarray:
        check_is_fitted(self)
        self.validate()
        pred, conf = self._predictions(views, self.n_logits_in_)
        layers = self._layers(views, self.layer_shapes_)
        return -(self._deviations(layers, pred, conf) / self.norm_).sum(axis=1)
