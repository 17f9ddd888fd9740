"""Feature-space detectors: fitted on the ID training features (penultimate layer).

Default ensemble strategy ``concat``: concatenate the members' features (per-member
L2-normalised for knn) and fit on the concatenated ID training features.
Both fit and score in blocks of ``CHUNK`` rows, so memory beyond the (memory-mapped)
features stays bounded: knn holds the normalised float32 bank once (n x D x 4 bytes),
mahalanobis holds class means and one D x r whitening matrix (its fit peaks at about
two D x D float64 matrices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from oodens.detectors.base import Detector, param, register_detector
from oodens.errors import OodensError
from oodens.views import Views

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


@register_detector
@dataclass
class KNN(FeatureDetector):
    """Deep nearest neighbours: ``-|| h/|h| - n_k ||``, with n_k the k-th nearest
    L2-normalised ID-training feature (exact search with faiss).

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    The exact flat index moves to the GPU when faiss has GPU support and sees a GPU.
    """

    name = "knn"
    k: int = param(50, "k-th nearest neighbour")
    _bank: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _index: object = field(default=None, init=False, repr=False, compare=False)
    _gpu: object = field(default=None, init=False, repr=False, compare=False)

    def member_features(self, features):
        return l2_normalize(features)

    def fit(self, train: Views) -> "KNN":
        import faiss

        feats = train.features
        if not 1 <= self.k <= len(feats):
            raise OodensError(f"--knn-k {self.k} is out of range: expected 1..{len(feats)} (the ID training set size)")
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # the GPU wheel on a machine with a GPU
            self._gpu = faiss.StandardGpuResources()
            self._index = faiss.GpuIndexFlatL2(self._gpu, feats.shape[1])
            for s in range(0, len(feats), CHUNK):  # normalised block by block into GPU memory
                self._index.add(np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK])))
            return self
        # CPU: the normalised bank is written once into a preallocated array and searched in
        # place by faiss's exact brute-force kernel (a flat index would copy it and grow its
        # storage by doubling: twice the memory)
        self._bank = np.empty(feats.shape, dtype=np.float32)
        for s in range(0, len(feats), CHUNK):
            self._bank[s : s + CHUNK] = l2_normalize(feats[s : s + CHUNK])
        return self

    def score(self, views: Views) -> np.ndarray:
        import faiss

        feats = views.features
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            q = np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK]))
            if self._index is not None:
                dist2, _ = self._index.search(q, self.k)
            else:
                dist2, _ = faiss.knn(q, self._bank, self.k, metric=faiss.METRIC_L2)
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
    """

    name = "mahalanobis"
    _means: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _whiten: np.ndarray = field(default=None, init=False, repr=False, compare=False)

    def fit(self, train: Views) -> "Mahalanobis":
        import scipy.linalg

        feats, y = train.features, np.asarray(train.labels)
        if (y < 0).any():
            raise OodensError("mahalanobis needs labelled ID training features (labels >= 0)")
        classes, idx, counts = np.unique(y, return_inverse=True, return_counts=True)
        d = feats.shape[1]
        sums = np.zeros((len(classes), d))
        for s in range(0, len(feats), CHUNK):  # two passes over the features in blocks: bounded memory
            np.add.at(sums, idx[s : s + CHUNK], np.asarray(feats[s : s + CHUNK], dtype=np.float64))
        self._means = sums / counts[:, None]
        scatter = np.zeros((d, d))
        for s in range(0, len(feats), CHUNK):
            centred = np.asarray(feats[s : s + CHUNK], dtype=np.float64) - self._means[idx[s : s + CHUNK]]
            scatter += centred.T @ centred
        scatter /= len(feats)
        # S^+ = W W^T with W = V_r diag(lambda_r^-1/2) over the eigenvalues above the pseudo-inverse
        # cutoff (numpy's pinv rule, 1e-15 x the largest; negative ones are round-off of a PSD
        # matrix). The eigensolver overwrites S: the fit peaks at about two D x D matrices.
        lam, vec = scipy.linalg.eigh(scatter, overwrite_a=True, driver="evd", check_finite=False)
        del scatter
        keep = lam > 1e-15 * max(lam.max(), 0.0)
        vec *= 1.0 / np.sqrt(np.where(keep, lam, 1.0))
        self._whiten = vec if keep.all() else np.ascontiguousarray(vec[:, keep])
        return self

    def score(self, views: Views) -> np.ndarray:
        """(h - mu_c)^T S^+ (h - mu_c) = |h W - mu_c W|^2, in blocks of queries."""
        feats = views.features
        mw = self._means @ self._whiten  # (C, r)
        mw2 = np.einsum("cr,cr->c", mw, mw)
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            hw = np.asarray(feats[s : s + CHUNK], dtype=np.float64) @ self._whiten
            d = np.einsum("nr,nr->n", hw, hw)[:, None] - 2.0 * hw @ mw.T + mw2[None, :]
            out[s : s + CHUNK] = -d.min(axis=1)
        return out
