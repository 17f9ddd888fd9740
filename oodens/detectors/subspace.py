"""Subspace detectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from oodens.detectors.base import Detector, check_is_fitted, param, register_detector
from oodens.detectors.logit import fitted_logits
from oodens.views.types import Views


def vim_default_dim(d: int) -> int:
    """ViM's principal dimension: 1000 if D >= 1500, 512 if D >= 768, else D/2."""
    return 1000 if d >= 1500 else 512 if d >= 768 else d // 2


def principal_dim(detector: Detector, d_feat: int) -> int:
    """The principal dimension d of ``detector`` (its ``dim``, else :func:`vim_default_dim`) for ``d_feat``-d
    features: 0 < d < d_feat, else a ParameterError naming ``dim``."""
    if detector.dim is None:
        d = vim_default_dim(d_feat)
        if not 0 < d < d_feat:
            raise detector._param_error("dim", f"gives d = {d} for {d_feat}-d features: expected features of at "
                                               "least 2 dimensions")
        return d
    if not detector.dim < d_feat:
        raise detector._param_error("dim", f"is out of range for {d_feat}-d features: expected 1..{d_feat - 1}")
    return detector.dim


@register_detector
@dataclass
class ViM(Detector):
    """ViM (Virtual-logit Matching): ``logsumexp(z) - alpha ||(h - u)_perp||`` with
    u = -W^+ b, perp the complement of the top-d principal subspace of the ID-train
    (h - u) (uncentred covariance), alpha = mean max train logit / mean train residual.

    Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    d = 1000 if D >= 1500, 512 if D >= 768, else D/2.

    Class-masked set (ImageNet-A/R; ``views.kept``): ``logsumexp(z[kept]) - alpha ||(h - u)_perp||``: the
    virtual logit lives in feature space and stays the full head's (u, the principal space and alpha as fitted on
    the full-width ID train); only the energy it is matched against reads the kept logits. oodens' choice (the
    paper and OpenOOD define nothing for masked sets): u = -W^+ b and alpha of the restricted head would need its
    own fit on the ID-train logits.

    Learned by ``fit``: ``dim_`` (d used), ``u_`` (D,), ``ns_`` (D, D - d) a basis of the
    complement, ``alpha_``, ``n_features_in_`` and ``n_logits_in_`` (the number of classes C).
    """

    name = "vim"
    family = "subspace"
    needs = ("logits", "features", "weight", "bias")
    needs_fit = True
    strategies = ("mean-scores",)
    dim: int | None = param(None, "principal subspace dimension d (default: 1000 if D >= 1500, 512 if D >= 768, "
                                  "else D/2)")

    def validate(self):
        if self.dim is not None:
            self._check_int("dim", 1)
        return self

    def fit(self, train: Views) -> "ViM":
        self.validate()
        h = np.asarray(self._matrix(train, "features"), dtype=np.float64)
        d_feat = h.shape[1]
        d = principal_dim(self, d_feat)
        w, b = self._head(train, d_feat)
        z = np.asarray(self._matrix(train, "logits", w.shape[0]), dtype=np.float64)
        u = -np.linalg.pinv(w) @ b
        x = h - u
        eigvals, eigvecs = np.linalg.eigh(x.T @ x / len(x))
        order = np.argsort(eigvals)[::-1]
        ns = eigvecs[:, order[d:]]
        residual = np.linalg.norm(x @ ns, axis=1)
        self.dim_, self.u_, self.ns_ = d, u, ns
        self.alpha_ = float(z.max(axis=1).mean() / residual.mean())
        self.n_features_in_, self.n_logits_in_ = d_feat, z.shape[1]
        return self

    def score(self, views: Views) -> np.ndarray:
        check_is_fitted(self)
        h = np.asarray(self._matrix(views, "features", self.n_features_in_), dtype=np.float64)
        z = np.asarray(fitted_logits(self, views, self.n_logits_in_)[0], dtype=np.float64)  # masked: kept logits
        residual = np.linalg.norm((h - self.u_) @ self.ns_, axis=1)
        return logsumexp(z, axis=1) - self.alpha_ * residual
