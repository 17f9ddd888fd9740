"""Feature-space detectors: fitted on the ID training features (penultimate layer).

Default ensemble strategy ``concat``: concatenate the members' features (per-member
L2-normalised for knn) and fit on the concatenated ID training features.
Both fit and score in blocks of ``CHUNK`` rows, so memory beyond the (memory-mapped)
features stays bounded: knn holds the normalised float32 bank once (n x D x 4 bytes),
mahalanobis holds class means and one D x r whitening matrix (its fit peaks at about
two D x D float64 matrices).
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


@register_detector
@dataclass
class Mahalanobis(FeatureDetector):
    """Class-conditional Gaussian with shared covariance:
    ``-min_c (h - mu_c)^T S^+ (h - mu_c)``, mu_c the ID-train class means (true labels),
    S the shared covariance of the class-centred features (divided by n), S^+ its pseudo-inverse.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018 (penultimate layer, no input preprocessing).

    Learned by ``fit``: ``classes_`` (the labels seen), ``means_`` (C, D) the class means,
    ``whiten_`` (D, r) with S^+ = whiten_ whiten_^T, ``n_features_in_``.
    """

    name = "mahalanobis"

    def fit(self, train: Views) -> "Mahalanobis":
        import scipy.linalg

        feats = self._fit_features(train)
        y = np.asarray(self._array(train, "labels"))
        if y.shape != (len(feats),):
            raise OodensError(f"mahalanobis needs one label per ID training sample: got labels of shape {y.shape} "
                              f"for {len(feats)} features")
        if (y < 0).any():
            raise OodensError("mahalanobis needs labelled ID training features (labels >= 0)")
        classes, idx, counts = np.unique(y, return_inverse=True, return_counts=True)
        d = feats.shape[1]
        sums = np.zeros((len(classes), d))
        for s in range(0, len(feats), CHUNK):  # two passes over the features in blocks: bounded memory
            np.add.at(sums, idx[s : s + CHUNK], np.asarray(feats[s : s + CHUNK], dtype=np.float64))
        means = sums / counts[:, None]
        scatter = np.zeros((d, d))
        for s in range(0, len(feats), CHUNK):
            centred = np.asarray(feats[s : s + CHUNK], dtype=np.float64) - means[idx[s : s + CHUNK]]
            scatter += centred.T @ centred
        scatter /= len(feats)
        # S^+ = W W^T with W = V_r diag(lambda_r^-1/2) over the eigenvalues above the pseudo-inverse
        # cutoff (numpy's pinv rule, 1e-15 x the largest; negative ones are round-off of a PSD
        # matrix). The eigensolver overwrites S: the fit peaks at about two D x D matrices.
        lam, vec = scipy.linalg.eigh(scatter, overwrite_a=True, driver="evd", check_finite=False)
        del scatter
        keep = lam > 1e-15 * max(lam.max(), 0.0)
        vec *= 1.0 / np.sqrt(np.where(keep, lam, 1.0))
        self.classes_, self.means_ = classes, means
        self.whiten_ = vec if keep.all() else np.ascontiguousarray(vec[:, keep])
        self.n_features_in_ = d
        return self

    def score(self, views: Views) -> np.ndarray:
        """(h - mu_c)^T S^+ (h - mu_c) = |h W - mu_c W|^2, in blocks of queries."""
        feats = self._score_features(views)
        mw = self.means_ @ self.whiten_  # (C, r)
        mw2 = np.einsum("cr,cr->c", mw, mw)
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            hw = np.asarray(feats[s : s + CHUNK], dtype=np.float64) @ self.whiten_
            d = np.einsum("nr,nr->n", hw, hw)[:, None] - 2.0 * hw @ mw.T + mw2[None, :]
            out[s : s + CHUNK] = -d.min(axis=1)
        return out
