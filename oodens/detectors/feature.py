"""Feature-space detectors: fitted on the ID training features (penultimate layer).

Default ensemble strategy ``concat``: concatenate the members' features (per-member
L2-normalised for knn) and fit on the concatenated ID training features.
Both fit and score in blocks of ``CHUNK`` rows, so memory beyond the (memory-mapped)
features stays bounded: knn holds the normalised float32 bank once (n x D x 4 bytes),
mahalanobis holds class means and one D x r whitening matrix (its fit peaks at about
two D x D float64 matrices), rmds one more mean and whitening matrix. The shared pieces
(:func:`class_means`, :func:`scatter`, :func:`pinv_factor`) serve other Gaussian detectors too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oodens.detectors.base import Detector, check_is_fitted, param, register_detector
from oodens.errors import OodensError
from oodens.views.types import Views

CHUNK = 8192  # query rows per block


def l2_normalize(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


@dataclass
class FeatureDetector(Detector):
    family = "feature"
    needs = ("features",)
    needs_fit = True
    strategies = ("concat", "mean-features", "mean-scores")

    def _fit_features(self, train: Views) -> np.ndarray:
        """The ID training features (n, D), hyperparameters validated first."""
        self.validate()
        feats = self._matrix(train, "features")
        if len(feats) == 0:
            raise OodensError(f"{self.name} needs ID training features, but the training views have 0 samples")
        return feats

    def _score_features(self, views: Views) -> np.ndarray:
        """The features to score (n, D), after checking the detector is fitted on D-d features."""
        check_is_fitted(self)
        self.validate()
        return self._matrix(views, "features", self.n_features_in_)


@register_detector
@dataclass
class KNN(FeatureDetector):
    """Deep nearest neighbours: ``-|| h/|h| - n_k ||``, with n_k the k-th nearest
    L2-normalised ID-training feature (exact search with faiss).

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    The exact flat index moves to the GPU when faiss has GPU support and sees a GPU.

    Learned by ``fit``: ``bank_`` (the normalised float32 ID-train features; None on the GPU),
    ``index_`` (the GPU flat index, or None), ``n_samples_fit_``, ``n_features_in_``.
    """

    name = "knn"
    k: int = param(50, "k-th nearest neighbour")

    def validate(self):
        self._check_int("k", 1)
        return self

    def validate_training_size(self, n: int) -> "KNN":
        if self.k > n:
            raise self._param_error("k", f"exceeds the {n} training samples: expected 1..{n}")
        return self

    def member_features(self, features):
        return l2_normalize(features)

    def fit(self, train: Views) -> "KNN":
        import faiss

        feats = self._fit_features(train)
        self.validate_training_size(len(feats))
        bank, index, gpu = None, None, None
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # the GPU wheel on a machine with a GPU
            gpu = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(gpu, feats.shape[1])
            for s in range(0, len(feats), CHUNK):  # normalised block by block into GPU memory
                index.add(np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK])))
        else:
            # CPU: the normalised bank is written once into a preallocated array and searched in
            # place by faiss's exact brute-force kernel (a flat index would copy it and grow its
            # storage by doubling: twice the memory)
            bank = np.empty(feats.shape, dtype=np.float32)
            for s in range(0, len(feats), CHUNK):
                bank[s : s + CHUNK] = l2_normalize(feats[s : s + CHUNK])
        self.bank_, self.index_, self.gpu_resources_ = bank, index, gpu
        self.n_samples_fit_, self.n_features_in_ = len(feats), feats.shape[1]
        return self

    def score(self, views: Views) -> np.ndarray:
        import faiss

        feats = self._score_features(views)
        self.validate_training_size(self.n_samples_fit_)  # k is read at query time: it may have changed since fit
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            q = np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK]))
            if self.index_ is not None:
                dist2, _ = self.index_.search(q, self.k)
            else:
                dist2, _ = faiss.knn(q, self.bank_, self.k, metric=faiss.METRIC_L2)
            out[s : s + CHUNK] = -np.sqrt(np.maximum(dist2[:, -1], 0.0))
        return out


def class_means(feats: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """The (n_classes, D) float64 means of the rows of ``feats`` by class index ``idx`` (0..n_classes-1),
    summed in blocks of CHUNK rows (bounded memory)."""
    sums = np.zeros((n_classes, feats.shape[1]))
    for s in range(0, len(feats), CHUNK):
        np.add.at(sums, idx[s : s + CHUNK], np.asarray(feats[s : s + CHUNK], dtype=np.float64))
    return sums / np.bincount(idx, minlength=n_classes)[:, None]


def mean_feature(feats: np.ndarray) -> np.ndarray:
    """The (D,) float64 mean row of ``feats``, summed in blocks of CHUNK rows."""
    total = np.zeros(feats.shape[1])
    for s in range(0, len(feats), CHUNK):
        total += np.asarray(feats[s : s + CHUNK], dtype=np.float64).sum(axis=0)
    return total / len(feats)


def scatter(feats: np.ndarray, means: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """The (D, D) float64 covariance ``(1/n) sum_i (h_i - m_i)(h_i - m_i)^T`` (divided by n), m_i = ``means[idx[i]]``
    (class-centred) or ``means`` itself when ``idx`` is None (one centre), accumulated in blocks of CHUNK rows."""
    out = np.zeros((feats.shape[1], feats.shape[1]))
    for s in range(0, len(feats), CHUNK):
        centre = means if idx is None else means[idx[s : s + CHUNK]]
        centred = np.asarray(feats[s : s + CHUNK], dtype=np.float64) - centre
        out += centred.T @ centred
    return out / len(feats)


def pinv_factor(cov: np.ndarray) -> np.ndarray:
    """W (D, r) with ``W W^T`` = the pseudo-inverse of the covariance ``cov`` (overwritten), cut at float32 resolution.

    W = V_r diag(lambda_r^-1/2) over the eigenvalues lambda > lambda_max * D * finfo(float32).eps: the features are
    float32, so directions whose variance is below what float32 rounding of the features alone produces (relative
    eps ~ 1.2e-7 per entry, summed over D entries) hold rounding noise, not signal; numpy's pinv cut (1e-15 x the
    largest) would keep them and weight that noise by up to 1e15 on near-degenerate covariances (a feature that is
    a rounded copy or combination of others). Negative eigenvalues are round-off of a PSD matrix. The eigensolver
    overwrites ``cov``: this peaks at about two D x D matrices.
    """
    import scipy.linalg

    d = cov.shape[0]
    lam, vec = scipy.linalg.eigh(cov, overwrite_a=True, driver="evd", check_finite=False)
    keep = lam > max(lam.max(), 0.0) * d * np.finfo(np.float32).eps
    vec *= 1.0 / np.sqrt(np.where(keep, lam, 1.0))
    return vec if keep.all() else np.ascontiguousarray(vec[:, keep])


def labelled_classes(det: Detector, train: Views, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, idx)``: the distinct labels of the ID training views and each sample's index into them;
    raises OodensError unless there is one label >= 0 per training sample."""
    y = np.asarray(det._array(train, "labels"))
    if y.shape != (n,):
        raise OodensError(f"{det.name} needs one label per ID training sample: got labels of shape {y.shape} "
                          f"for {n} features")
    if (y < 0).any():
        raise OodensError(f"{det.name} needs labelled ID training features (labels >= 0)")
    classes, idx = np.unique(y, return_inverse=True)
    return classes, idx


def sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("nr,nr->n", x, x)


@register_detector
@dataclass
class Mahalanobis(FeatureDetector):
    """Class-conditional Gaussian with shared covariance:
    ``-min_c (h - mu_c)^T S^+ (h - mu_c)``, mu_c the ID-train class means (true labels),
    S the shared covariance of the class-centred features (divided by n), S^+ its pseudo-inverse.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018 (penultimate layer, no input preprocessing).

    The pseudo-inverse keeps the eigenvalues of S above lambda_max * D * finfo(float32).eps (float32
    resolution: the features are float32; see :func:`pinv_factor`), not numpy's 1e-15 x lambda_max,
    which weights float32 rounding noise by up to 1e15 on near-degenerate covariances.

    Learned by ``fit``: ``classes_`` (the labels seen), ``means_`` (C, D) the class means,
    ``whiten_`` (D, r) with S^+ = whiten_ whiten_^T, ``n_features_in_``.
    """

    name = "mahalanobis"

    def fit(self, train: Views) -> "Mahalanobis":
        feats = self._fit_features(train)
        classes, idx = labelled_classes(self, train, len(feats))
        means = class_means(feats, idx, len(classes))  # two passes over the features in blocks: bounded memory
        self.classes_, self.means_ = classes, means
        self.whiten_ = pinv_factor(scatter(feats, means, idx))
        self.n_features_in_ = feats.shape[1]
        return self

    def class_distances(self, h: np.ndarray) -> np.ndarray:
        """(n, C) squared distances (h - mu_c)^T S^+ (h - mu_c) = |h W - mu_c W|^2 of a block of float64 features."""
        mw = self.means_ @ self.whiten_  # (C, r)
        hw = h @ self.whiten_
        return sq_norms(hw)[:, None] - 2.0 * hw @ mw.T + sq_norms(mw)[None, :]

    def score_block(self, h: np.ndarray) -> np.ndarray:
        return -self.class_distances(h).min(axis=1)

    def score(self, views: Views) -> np.ndarray:
        """The score of each block of CHUNK queries (float64)."""
        feats = self._score_features(views)
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            out[s : s + CHUNK] = self.score_block(np.asarray(feats[s : s + CHUNK], dtype=np.float64))
        return out


@register_detector
@dataclass
class RMDS(Mahalanobis):
    """Relative Mahalanobis distance: ``-min_c [MD_c(h) - MD_0(h)]``, MD_c the Mahalanobis distance
    to class c (class means and shared class-centred covariance, exactly as ``mahalanobis``), MD_0 the
    distance to a single Gaussian fitted on all ID-train features (their global mean and covariance,
    divided by n). Equivalently ``MD_0(h) - min_c MD_c(h)``. No hyperparameters.

    Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
    arXiv:2106.09022 (ICML 2021 UDL workshop), 2021. OpenOOD v1.5's ``rmds`` is the same formula.
    Both pseudo-inverses are cut at float32 resolution (see :func:`pinv_factor`).

    Ensemble strategies as mahalanobis (``concat`` default, ``mean-features``, ``mean-scores``): it fits
    on features and labels only, so it refits on the combined features.

    Learned by ``fit``: as mahalanobis, plus ``mean0_`` (D,) the global mean and ``whiten0_`` (D, r0)
    with Sigma_0^+ = whiten0_ whiten0_^T.
    """

    name = "rmds"

    def fit(self, train: Views) -> "RMDS":
        super().fit(train)
        feats = self._matrix(train, "features")
        self.mean0_ = mean_feature(feats)
        self.whiten0_ = pinv_factor(scatter(feats, self.mean0_))
        return self

    def score_block(self, h: np.ndarray) -> np.ndarray:
        md0 = sq_norms((h - self.mean0_) @ self.whiten0_)
        return md0 - self.class_distances(h).min(axis=1)
