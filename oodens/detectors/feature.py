"""Feature-space detectors: fitted on the ID training features (penultimate layer).

Default ensemble strategy ``concat``: concatenate the members' features (per-member
L2-normalised for knn) and fit on the concatenated ID training features.
Both fit and score in blocks of ``CHUNK`` rows, so memory beyond the (memory-mapped)
features stays bounded: knn holds the normalised bank in its faiss index, mahalanobis
holds class means and one D x D matrix.
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
    _index: object = field(default=None, init=False, repr=False, compare=False)
    _gpu: object = field(default=None, init=False, repr=False, compare=False)

    def member_features(self, features):
        return l2_normalize(features)

    def fit(self, train: Views) -> "KNN":
        import faiss

        feats = train.features
        if not 1 <= self.k <= len(feats):
            raise OodensError(f"--knn-k {self.k} is out of range: expected 1..{len(feats)} (the ID training set size)")
        self._index = faiss.IndexFlatL2(feats.shape[1])
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # the GPU wheel on a machine with a GPU
            self._gpu = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu, 0, self._index)
        for s in range(0, len(feats), CHUNK):  # normalise and add block by block: no full float32 copy
            self._index.add(np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK])))
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = views.features
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            q = np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK]))
            dist2, _ = self._index.search(q, self.k)
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
    _precision: np.ndarray = field(default=None, init=False, repr=False, compare=False)

    def fit(self, train: Views) -> "Mahalanobis":
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
        self._precision = np.linalg.pinv(scatter / len(feats), hermitian=True)
        return self

    def score(self, views: Views) -> np.ndarray:
        feats = views.features
        mp = self._means @ self._precision  # (C, D)
        mpm = np.einsum("cd,cd->c", mp, self._means)
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            h = np.asarray(feats[s : s + CHUNK], dtype=np.float64)
            hph = np.einsum("nd,nd->n", h @ self._precision, h)
            d = hph[:, None] - 2.0 * h @ mp.T + mpm[None, :]
            out[s : s + CHUNK] = -d.min(axis=1)
        return out
