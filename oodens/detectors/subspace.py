"""Subspace detectors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from oodens.detectors.base import Detector, param, register_detector
from oodens.errors import OodensError
from oodens.views import Views


def vim_default_dim(d: int) -> int:
    """ViM's principal dimension: 1000 if D >= 1500, 512 if D >= 768, else D/2."""
    return 1000 if d >= 1500 else 512 if d >= 768 else d // 2


@register_detector
@dataclass
class ViM(Detector):
    """ViM (Virtual-logit Matching): ``logsumexp(z) - alpha ||(h - u)_perp||`` with
    u = -W^+ b, perp the complement of the top-d principal subspace of the ID-train
    (h - u) (uncentred covariance), alpha = mean max train logit / mean train residual.

    Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    d = 1000 if D >= 1500, 512 if D >= 768, else D/2.
    """

    name = "vim"
    family = "subspace"
    needs = ("logits", "features", "weight", "bias")
    needs_fit = True
    strategies = ("mean-scores",)
    dim: int | None = param(None, "principal subspace dimension d (default: 1000 if D >= 1500, 512 if D >= 768, "
                                  "else D/2)")
    _u: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _ns: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _alpha: float = field(default=None, init=False, repr=False, compare=False)

    def fit(self, train: Views) -> "ViM":
        h = np.asarray(train.features, dtype=np.float64)
        d_feat = h.shape[1]
        d = vim_default_dim(d_feat) if self.dim is None else self.dim
        if not 0 < d < d_feat:
            raise OodensError(f"--vim-dim {d} is out of range: expected 1..{d_feat - 1} (feature size {d_feat})")
        w, b = np.asarray(train.weight, dtype=np.float64), np.asarray(train.bias, dtype=np.float64)
        self._u = -np.linalg.pinv(w) @ b
        x = h - self._u
        eigvals, eigvecs = np.linalg.eigh(x.T @ x / len(x))
        order = np.argsort(eigvals)[::-1]
        self._ns = eigvecs[:, order[d:]]
        residual = np.linalg.norm(x @ self._ns, axis=1)
        self._alpha = float(np.asarray(train.logits, dtype=np.float64).max(axis=1).mean() / residual.mean())
        return self

    def score(self, views: Views) -> np.ndarray:
        h = np.asarray(views.features, dtype=np.float64)
        residual = np.linalg.norm((h - self._u) @ self._ns, axis=1)
        return logsumexp(np.asarray(views.logits, dtype=np.float64), axis=1) - self._alpha * residual
