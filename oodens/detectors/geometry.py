"""Feature-geometry detectors fitted on the ID training features and read with the final layer or the logits:
Residual, NECO, NCI, fDBD, SHE, NNGuide, Relation (RMDS lives next to Mahalanobis in :mod:`feature`).

Ensemble strategies, declared per detector: a detector that fits on features (and labels) only (neco)
refits on the combined features (``concat`` by default, ``mean-features``, ``mean-scores``); one that
reads the member's own final layer (W, b) or its logits (residual, nci, fdbd, she, nnguide, relation)
averages the members' scores (``mean-scores``, its only strategy): a concatenated or averaged feature
vector has no head or logits of its own.

Memory stays bounded as for knn/mahalanobis: fits accumulate D x D statistics in blocks of ``CHUNK``
rows, scoring runs in blocks of ``CHUNK`` queries, and the detectors that keep the training set
(nnguide, relation) keep it once as float32 banks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax

from oodens.detectors.base import Detector, _is_real, param, register_detector
from oodens.detectors.feature import (CHUNK, DeviceBank, bank_search, build_bank, l2_normalize, labelled_classes,
                                      mean_feature, scatter)
from oodens.detectors.logit import fitted_logits
from oodens.detectors.subspace import principal_dim
from oodens.errors import OodensError
from oodens.views.types import Views

BANK_CHUNK = 4096  # bank rows per block of a query x bank relation matrix (relation)


@dataclass
class GeometryDetector(Detector):
    """Fitted on the ID training features; scores per member (``mean-scores``) unless it says otherwise."""

    family = "geometry"
    needs = ("features", "weight", "bias")
    needs_fit = True
    strategies = ("mean-scores",)

    def _train_logits(self, train: Views, n: int) -> np.ndarray:
        z = self._matrix(train, "logits")
        if len(z) != n:
            raise OodensError(f"{self.name} needs one logit row per ID training sample: got {len(z)} for {n} features")
        return z

    def _blocks(self, n: int):
        for s in range(0, n, CHUNK):
            yield slice(s, min(s + CHUNK, n))


@dataclass
class CentredDetector(GeometryDetector):
    """A geometry detector whose ``fit`` learns only the mean ID-train feature ``mean_`` (nci, fdbd)."""

    def fit(self, train: Views) -> "CentredDetector":
        feats = self._fit_features(train)
        self.mean_ = mean_feature(feats)
        self.n_features_in_ = feats.shape[1]
        return self


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _bank_rows(bank, rows: slice) -> np.ndarray:
    """Rows of a bank (:func:`oodens.detectors.feature.build_bank`: an array, a memory map or a
    :class:`~oodens.detectors.feature.DeviceBank`) as float32 on the host."""
    return bank.rows(rows) if isinstance(bank, DeviceBank) else np.asarray(bank[rows], dtype=np.float32)


# --------------------------------------------------------------------------- residual


@register_detector
@dataclass
class Residual(GeometryDetector):
    """Residual: ``-||(h - u)_perp||``, ViM's virtual-logit term on its own: u = -W^+ b, perp the
    complement of the top-d principal subspace of the ID-train (h - u) (uncentred second moment, as ViM).

    Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022 (its "Residual"
    baseline). d follows the paper's rule as oodens' vim (1000 if D >= 1500, 512 if D >= 768, else D/2);
    OpenOOD v1.5's ``residual`` config fixes d = 512 whatever D is (a D of 512, as a CIFAR ResNet-18's,
    leaves an empty complement there).

    Strategies: ``mean-scores`` only, since u comes from the member's own head (W, b).

    Learned by ``fit``: ``dim_`` (d used), ``u_`` (D,), ``ns_`` (D, D - d) an orthonormal basis of the
    complement, ``n_features_in_``.
    """

    name = "residual"
    family = "subspace"
    dim: int | None = param(None, "principal subspace dimension d (default: 1000 if D >= 1500, 512 if D >= 768, "
                                  "else D/2)")

    def validate(self):
        if self.dim is not None:
            self._check_int("dim", 1)
        return self

    def fit(self, train: Views) -> "Residual":
        feats = self._fit_features(train)
        d_feat = feats.shape[1]
        d = principal_dim(self, d_feat)
        w, b = self._head(train, d_feat)
        u = -np.linalg.pinv(w) @ b
        lam, vec = np.linalg.eigh(scatter(feats, u))  # (1/n) sum (h - u)(h - u)^T, in blocks
        order = np.argsort(lam)[::-1]
        self.dim_, self.u_ = d, u
        self.ns_ = np.ascontiguousarray(vec[:, order[d:]])
        self.n_features_in_ = d_feat
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            out[s] = -np.linalg.norm((_f64(feats[s]) - self.u_) @ self.ns_, axis=1)
        return out


# --------------------------------------------------------------------------- neco


@register_detector
@dataclass
class NECO(GeometryDetector):
    """NECO: ``||P z|| / ||z||`` with z = (h - mean) / std the feature standardised on ID train
    (per dimension, std with ddof 0, constant dimensions left unscaled, as scikit-learn's StandardScaler)
    and P the projection on the top-d principal components of the standardised ID-train features;
    with ``maxlogit`` the ratio is multiplied by the max logit max_c z_c.

    Ben Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection", ICLR 2024.
    The max-logit factor: the authors' code (gitlab.com/drti/neco) multiplies by the max logit for
    the vision transformers (ViT, DeiT, Swin) and not for ResNets, so the default here (oodens' modes are
    CNNs) is the plain ratio, ``maxlogit=False``; set it for transformer features. (For DeiT/Swin that code
    also divides by the raw ``||h||`` instead of ``||z||``; oodens always uses ``||z||``.)
    d: the authors' code takes it per setting (its ``--neco_dim``, "ETF approximative dimension", default
    100); the default here is the dimension of the simplex ETF that neural collapse predicts, C - 1 for the
    C classes of the ID training labels. OpenOOD v1.5 has no NECO postprocessor.

    Strategies: ``concat`` (default), ``mean-features``, ``mean-scores``: it fits on features only. With
    ``maxlogit`` the combined views carry no logits, so only ``mean-scores`` applies then.

    Learned by ``fit``: ``mean_`` and ``scale_`` (D,) the standardisation, ``dim_`` (d used), ``components_``
    (D, d) the top-d principal directions of the standardised features, ``n_features_in_``.
    """

    name = "neco"
    family = "feature"
    needs = ("features",)
    strategies = ("concat", "mean-features", "mean-scores")
    dim: int | None = param(None, "number of principal components d (default: C - 1, the simplex ETF's dimension, "
                                  "C the number of ID training classes)")
    maxlogit: bool = param(False, "multiply the ratio by the max logit (the authors' code does for ViT/DeiT/Swin, "
                                  "not for ResNets)")

    def validate(self):
        if self.dim is not None:
            self._check_int("dim", 1)
        if not isinstance(self.maxlogit, (bool, np.bool_)):
            raise self._param_error("maxlogit", "is not a boolean: expected True or False")
        return self

    def fit(self, train: Views) -> "NECO":
        feats = self._fit_features(train)
        n, d_feat = feats.shape
        if self.dim is None:
            classes, _ = labelled_classes(self, train, n)
            d = len(classes) - 1
            if not 0 < d < d_feat:
                raise self._param_error("dim", f"gives d = C - 1 = {d} for {len(classes)} classes and {d_feat}-d "
                                               f"features: expected 1..{d_feat - 1}, set dim")
        elif not self.dim < d_feat:
            raise self._param_error("dim", f"is out of range for {d_feat}-d features: expected 1..{d_feat - 1}")
        else:
            d = self.dim
        mean = mean_feature(feats)
        cov = scatter(feats, mean)  # covariance of h (divided by n); that of z is cov / (s s^T)
        var = np.diag(cov).copy()
        # constant dimensions keep scale 1 (StandardScaler's rule: variance at round-off level of the mean)
        constant = var <= (n * np.finfo(np.float64).eps * np.abs(mean)) ** 2 + np.finfo(np.float64).tiny
        scale = np.where(constant, 1.0, np.sqrt(var))
        lam, vec = np.linalg.eigh(cov / np.outer(scale, scale))
        order = np.argsort(lam)[::-1]
        self.mean_, self.scale_, self.dim_ = mean, scale, d
        self.components_ = np.ascontiguousarray(vec[:, order[:d]])
        self.n_features_in_ = d_feat
        if self.maxlogit:
            self.n_logits_in_ = self._train_logits(train, n).shape[1]
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        z_logits = None
        if self.maxlogit:  # a class-masked set: the max of its kept logits
            fitted = getattr(self, "n_logits_in_", None)
            z_logits = self._matrix(views, "logits") if fitted is None else fitted_logits(self, views, fitted)[0]
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            z = (_f64(feats[s]) - self.mean_) / self.scale_
            full = np.linalg.norm(z, axis=1)
            ratio = np.linalg.norm(z @ self.components_, axis=1) / np.maximum(full, np.finfo(np.float64).tiny)
            out[s] = ratio * _f64(z_logits[s]).max(axis=1) if z_logits is not None else ratio
        return out


# --------------------------------------------------------------------------- nci and fdbd (the final layer)


def _head_logits(h: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return h @ w.T + b


@register_detector
@dataclass
class NCI(CentredDetector):
    """NCI: ``w_yhat . (h - mu_G) / ||h - mu_G|| + alpha ||h||_1``, yhat = argmax of h W^T + b, mu_G
    the mean ID-train feature: proximity of the centred feature to the predicted class's weight vector
    (neural collapse: centred ID features align with their class weights), plus an L1-norm filter (ID
    features lie farther from the origin).

    Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse", CVPR 2025
    (arXiv:2311.01479). The formula and alpha follow the authors' code, which is OpenOOD v1.5's ``nci``
    postprocessor (their repository points to it): the proximity is the dot product with w_yhat (not
    divided by ||w_yhat||); alpha = 1e-4 is its config default (OpenOOD searches alpha in {1e-4, 1e-3,
    1e-2, 0.1} on OOD validation data, which oodens does not use).

    Strategies: ``mean-scores`` only (it reads the member's own head W, b).

    Learned by ``fit``: ``mean_`` (D,) mu_G, ``n_features_in_``.
    """

    name = "nci"
    alpha: float = param(1e-4, "weight alpha of the L1 feature-norm term")

    def validate(self):
        self._check_nonnegative("alpha")
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        w, b = self._head(views, self.n_features_in_)
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            h = _f64(feats[s])
            pred = _head_logits(h, w, b).argmax(axis=1)
            c = h - self.mean_
            norm = np.maximum(np.linalg.norm(c, axis=1), np.finfo(np.float64).tiny)
            out[s] = np.einsum("nd,nd->n", w[pred], c) / norm + self.alpha * np.abs(h).sum(axis=1)
        return out


@register_detector
@dataclass
class FDBD(CentredDetector):
    """fDBD: ``mean_{c != yhat} |(w_yhat - w_c) . h + (b_yhat - b_c)| / ||w_yhat - w_c||``, divided by
    ``||h - mu_train||``: the average feature-space distance to the decision boundaries between the
    predicted class yhat = argmax(h W^T + b) and the others, regularised by the distance to the mean
    ID-train feature. No hyperparameters.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024. OpenOOD v1.5's
    ``fdbd`` sums over the classes instead of averaging (the same ranking: a factor C - 1) and may pick
    ``||h||`` as the regulariser on OOD validation data; oodens follows the paper (mean, ``||h - mu||``).
    Two classes with identical weight vectors have no boundary in feature space: their term counts 0.

    Strategies: ``mean-scores`` only (it reads the member's own head W, b).

    Learned by ``fit``: ``mean_`` (D,) mu_train, ``n_features_in_``.
    """

    name = "fdbd"

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        w, b = self._head(views, self.n_features_in_)
        n_classes = len(b)
        if n_classes < 2:
            raise OodensError(f"fdbd needs a head with at least 2 classes, got {n_classes}")
        # ||w_a - w_c|| for every pair, one row at a time (C x D memory)
        dist_w = np.stack([np.linalg.norm(w - w[a], axis=1) for a in range(n_classes)])
        inv_w = np.divide(1.0, dist_w, out=np.zeros_like(dist_w), where=dist_w > 0)  # 0 on the diagonal too
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            h = _f64(feats[s])
            z = _head_logits(h, w, b)
            pred = z.argmax(axis=1)
            margin = np.abs(z[np.arange(len(z)), pred][:, None] - z)  # |z_yhat - z_c|, 0 at c = yhat
            boundary = (margin * inv_w[pred]).sum(axis=1) / (n_classes - 1)
            out[s] = boundary / np.maximum(np.linalg.norm(h - self.mean_, axis=1), np.finfo(np.float64).tiny)
        return out


# --------------------------------------------------------------------------- she (predictions and labels)


def _predicted_labels(z: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """The dataset class of each row's argmax logit (a leave-out member's logit columns are its kept classes)."""
    pred = z.argmax(axis=1)
    return pred if classes is None else np.asarray(classes)[pred]


@register_detector
@dataclass
class SHE(GeometryDetector):
    """SHE (Simplified Hopfield Energy): ``h . m_yhat``, yhat = argmax z the predicted class and m_c the
    stored pattern of class c, the mean feature of the ID-train samples of class c that the network
    classifies correctly. No hyperparameters.

    Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization
    with Modern Hopfield Energy", ICLR 2023. OpenOOD v1.5's ``she`` (inner-product metric) is the same.

    Strategies: ``mean-scores`` only (it reads the member's own predictions, its logits).

    Class-masked set (ImageNet-A/R; ``views.kept``): yhat = argmax of the kept logits, scored against the kept
    classes' stored patterns (``patterns_[kept]``, fitted on the full head as usual). oodens' choice: the patterns
    are properties of the classes' ID features; the paper and OpenOOD define nothing for masked sets.

    Learned by ``fit``: ``patterns_`` (C, D) one stored pattern per logit column, ``n_features_in_``,
    ``n_logits_in_``.
    """

    name = "she"
    needs = ("logits", "features")

    def fit(self, train: Views) -> "SHE":
        feats = self._fit_features(train)
        n = len(feats)
        z = self._train_logits(train, n)
        y = np.asarray(self._array(train, "labels"))
        if y.shape != (n,):
            raise OodensError(f"she needs one label per ID training sample: got labels of shape {y.shape} "
                              f"for {n} features")
        n_classes = z.shape[1]
        sums, counts = np.zeros((n_classes, feats.shape[1])), np.zeros(n_classes)
        for s in self._blocks(n):
            zb = _f64(z[s])
            pred = zb.argmax(axis=1)
            ok = _predicted_labels(zb, train.classes) == y[s]
            np.add.at(sums, pred[ok], _f64(feats[s])[ok])
            counts += np.bincount(pred[ok], minlength=n_classes)
        if (counts == 0).any():
            missing = np.flatnonzero(counts == 0)
            names = missing if train.classes is None else np.asarray(train.classes)[missing]
            raise OodensError(f"she stores the mean feature of the correctly classified ID training samples of "
                              f"each class, but class(es) {', '.join(map(str, names.tolist()))} have none")
        self.patterns_ = sums / counts[:, None]
        self.n_features_in_, self.n_logits_in_ = feats.shape[1], n_classes
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        z, kept = fitted_logits(self, views, self.n_logits_in_)
        patterns = self.patterns_ if kept is None else self.patterns_[kept]  # a class-masked set: the kept classes'
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            pred = _f64(z[s]).argmax(axis=1)
            out[s] = np.einsum("nd,nd->n", _f64(feats[s]), patterns[pred])
        return out


# --------------------------------------------------------------------------- nnguide and relation (banks)


@register_detector
@dataclass
class NNGuide(GeometryDetector):
    """NNGuide: ``conf(z) * guidance(h)``, conf = logsumexp(z) (energy) and guidance the mean of the k
    largest inner products between h/||h|| and the confidence-scaled bank
    {conf(z_i) h_i/||h_i||} of ID-train samples.

    Park et al., "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    k = 100 as OpenOOD v1.5's ``nnguide`` config (the authors' repository configures k = 10). The bank:
    OpenOOD keeps a fraction alpha = 0.01 of the training set (the first batches of its loader); here
    ``bank_fraction`` (default 1.0: the whole ID-train split) keeps a seeded random subset of
    ceil(n * bank_fraction) samples when below 1.

    Strategies: ``mean-scores`` only (it reads the member's own logits for the confidences).

    Class-masked set (ImageNet-A/R; ``views.kept``): the confidences are energies of kept logits on both sides,
    conf(z[kept]) of the sample and a bank re-weighted to {conf(z_i[kept]) h_i/||h_i||} (built for the call, from
    the bank rows' logits that fit keeps): the 200-class model's NNGuide on the same bank samples. oodens' choice
    (the paper and OpenOOD define nothing for masked sets).

    Learned by ``fit``: ``bank_`` (m, D) float32 the scaled bank, ``conf_`` (m,) float32 the bank's confidences,
    ``logits_`` (m, C) float32 the bank rows' logits (for class-masked sets; in memory or on disk as the bank:
    C/D of its size), ``n_samples_fit_`` (m), ``n_features_in_``, ``n_logits_in_``.
    """

    name = "nnguide"
    needs = ("logits", "features")
    k: int = param(100, "number k of nearest (largest inner product) bank samples averaged")
    bank_fraction: float = param(1.0, "fraction of the ID training samples kept in the bank (seeded random subset)")

    def validate(self):
        self._check_int("k", 1)
        if not _is_real(self.bank_fraction) or not 0 < self.bank_fraction <= 1:
            raise self._param_error("bank_fraction", "is out of range: expected a fraction in (0, 1]")
        return self

    def bank_size(self, n: int) -> int:
        return min(n, max(1, math.ceil(n * self.bank_fraction)))

    def validate_training_size(self, n: int) -> "NNGuide":
        m = self.bank_size(n)
        if self.k > m:
            raise self._param_error("k", f"exceeds the {m} bank samples ({n} training samples x bank_fraction "
                                         f"{self.bank_fraction:g}): expected 1..{m}")
        return self

    def fit(self, train: Views) -> "NNGuide":
        feats = self._fit_features(train)
        n = len(feats)
        z = self._train_logits(train, n)
        self.validate_training_size(n)
        m = self.bank_size(n)
        rows = np.arange(n) if m == n else np.sort(np.random.default_rng(0).choice(n, m, replace=False))
        conf = np.concatenate([logsumexp(_f64(z[rows[s]]), axis=1) for s in self._blocks(m)]).astype(np.float32)
        # in memory, or on disk above the bank memory cap (--knn-memory): see oodens.detectors.feature.build_bank
        bank = build_bank(m, feats.shape[1], (l2_normalize(feats[rows[s]]) * conf[s, None] for s in self._blocks(m)))
        self.bank_, self.conf_, self.n_samples_fit_ = bank, conf, m
        self.logits_ = build_bank(m, z.shape[1], (np.asarray(z[rows[s]], dtype=np.float32) for s in self._blocks(m)),
                                  searched=False)
        self.n_features_in_, self.n_logits_in_ = feats.shape[1], z.shape[1]
        return self

    def masked_bank(self, kept: np.ndarray):
        """The bank re-weighted for a class-masked set: row i is ``h_i/||h_i|| conf(z_i[kept])``, its unit feature
        recovered as ``bank_[i] / conf_[i]`` (``conf_[i]`` = 0, a unit feature lost to the scaling, counts 0)."""
        def blocks():
            for s in self._blocks(self.n_samples_fit_):
                c = self.conf_[s]
                unit = np.divide(_bank_rows(self.bank_, s), c[:, None], out=np.zeros((len(c), self.n_features_in_),
                                 dtype=np.float32), where=c[:, None] != 0)
                conf = logsumexp(_f64(self.logits_[s])[:, kept], axis=1).astype(np.float32)
                yield unit * conf[:, None]

        return build_bank(self.n_samples_fit_, self.n_features_in_, blocks())

    def score(self, views: Views) -> np.ndarray:
        import faiss

        feats = self._score_features(views)
        z, kept = fitted_logits(self, views, self.n_logits_in_)
        self.validate_training_size(self.n_samples_fit_)  # k is read at query time (bank size is what fit kept)
        bank = self.bank_ if kept is None else self.masked_bank(kept)
        out = np.empty(len(feats))
        for s in self._blocks(len(feats)):
            q = np.ascontiguousarray(l2_normalize(feats[s]))
            sim, _ = bank_search(q, bank, self.k, faiss.METRIC_INNER_PRODUCT)
            out[s] = logsumexp(_f64(z[s]), axis=1) * _f64(sim).mean(axis=1)
        return out


@register_detector
@dataclass
class Relation(GeometryDetector):
    """Relation: ``sum_i [r_i > t] r_i^power`` over the ID-train samples i, with the relation kernel
    ``r_i = max(0, h^ . h^_i) * (p . p_i)`` (h^ = h/||h||, p = softmax(z)): the total weight of the
    test sample's edges in the neural relation graph of the ID training set (OOD samples have weak edges).

    Kim et al., "Neural Relation Graph: A Unified Framework for Identifying Label Noise and Outlier
    Data", NeurIPS 2023. Defaults from the authors' code (``get_relation``: pow = 1, edge cut-off
    thres = 0.03), as OpenOOD v1.5's ``relation`` (which searches pow in {1, 2, 4, 6, 8} on OOD
    validation data, which oodens does not use).

    Strategies: ``mean-scores`` only (it reads the member's own probabilities, from its logits).
    Memory: the normalised features and the probabilities of the training set, float32, each in memory or,
    above the bank memory cap (``--knn-memory``), memory-mapped from a file as knn's bank
    (:func:`oodens.detectors.feature.build_bank`); relations in blocks of CHUNK queries x BANK_CHUNK training
    samples, so a bank on disk is read sequentially once per query block.

    Class-masked set (ImageNet-A/R; ``views.kept``): p = softmax(z[kept]) and p_i = softmax(z_i[kept]), the
    stored probabilities restricted to the kept columns and renormalised (which is softmax of the kept logits;
    a training row whose kept probabilities all underflow float32, a logit gap above ~100, has no edge): the
    200-class model's relation graph on the same training samples. oodens' choice (the paper and OpenOOD define
    nothing for masked sets).

    Learned by ``fit``: ``bank_`` (n, D) float32 normalised features, ``probs_`` (n, C) float32 softmax
    probabilities, ``n_features_in_``, ``n_logits_in_``.
    """

    name = "relation"
    needs = ("logits", "features")
    power: float = param(1.0, "exponent of the kernel values summed (the authors' pow)")
    threshold: float = param(0.03, "edges with a kernel value at or below this are cut")

    def validate(self):
        self._check_positive("power")
        self._check_nonnegative("threshold")
        return self

    def fit(self, train: Views) -> "Relation":
        feats = self._fit_features(train)
        n = len(feats)
        z = self._train_logits(train, n)
        blocks = list(self._blocks(n))
        self.bank_ = build_bank(n, feats.shape[1], (l2_normalize(feats[s]) for s in blocks), searched=False)
        self.probs_ = build_bank(n, z.shape[1], (softmax(_f64(z[s]), axis=1) for s in blocks), searched=False)
        self.n_features_in_, self.n_logits_in_ = feats.shape[1], z.shape[1]
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = self._score_features(views)
        z, kept = fitted_logits(self, views, self.n_logits_in_)
        out = np.zeros(len(feats))
        for s in self._blocks(len(feats)):
            q = l2_normalize(feats[s])
            p = softmax(_f64(z[s]), axis=1).astype(np.float32)
            for t in range(0, len(self.bank_), BANK_CHUNK):
                probs = self.probs_[t : t + BANK_CHUNK]
                if kept is not None:  # a class-masked set: softmax of the kept logits = p_i[kept] renormalised
                    probs = _f64(probs[:, kept])
                    mass = probs.sum(axis=1, keepdims=True)
                    probs = np.divide(probs, mass, out=np.zeros_like(probs), where=mass > 0).astype(np.float32)
                rel = np.maximum(q @ self.bank_[t : t + BANK_CHUNK].T, 0.0) * (p @ probs.T)
                rel = _f64(rel)
                out[s] += np.where(rel > self.threshold, rel ** self.power, 0.0).sum(axis=1)
        return out
