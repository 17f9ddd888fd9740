"""Detectors fitted on the ID validation split (temperature-scaled MSP).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax

from oodens.detectors.base import check_is_fitted, register_detector
from oodens.detectors.logit import LogitDetector, fitted_logits
from oodens.errors import OodensError, OodensWarning
from oodens.views.types import Views

#: the temperature is searched in [1/T_RANGE, T_RANGE] (on log T)
T_RANGE = 100.0


def nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of the labels ``y`` under softmax(z / t)."""
    zt = z / t
    return float(np.mean(logsumexp(zt, axis=1) - zt[np.arange(len(y)), y]))


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """argmin_T NLL(softmax(z / T), y) over T in [1/100, 100] (bounded Brent search on log T; the NLL is convex
    in 1/T, so the minimum is the global one). When every sample is classified right the NLL keeps falling as
    T -> 0 and has no minimum: nothing can be calibrated (typically a hold-out the network was trained on), so
    T = 1 (plain MSP), with an :class:`OodensWarning` saying why."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    bound = float(np.log(T_RANGE))
    res = minimize_scalar(lambda u: nll(z, y, float(np.exp(u))), bounds=(-bound, bound), method="bounded",
                          options={"xatol": 1e-8})
    t = float(np.exp(res.x))
    if nll(z, y, 1.0 / T_RANGE) <= nll(z, y, t):  # no interior minimum: every sample classified right
        warnings.warn("tempscale: no temperature minimises the NLL of the ID validation split (every sample is "
                      "classified right, as on a hold-out the network was trained on): T = 1, plain MSP",
                      OodensWarning, stacklevel=2)
        t = 1.0
    return t


def _labelled(views: Views) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``views`` with a class the member predicts, and those classes as column indices (a
    leave-out member, ``views.classes`` set, predicts its kept classes only)."""
    y = np.asarray(views.labels if views.labels is not None else [], dtype=np.int64)
    classes = np.arange(np.shape(views.logits)[1]) if views.classes is None else np.asarray(views.classes)
    column = {int(c): i for i, c in enumerate(classes)}
    keep = np.array([int(c) in column for c in y], dtype=bool)
    return keep, np.array([column[int(c)] for c in y[keep]], dtype=np.int64)


@register_detector
@dataclass
class TempScaledMSP(LogitDetector):
    """Temperature-scaled maximum softmax probability: ``max_c softmax(z / T)_c``, with T fitted on the ID
    validation split by minimising the negative log-likelihood of its labels,
    ``T = argmin_T -(1/n) sum_i log softmax(z_i / T)_{y_i}`` (bounded search on log T, T in [0.01, 100]).

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling); the score is
    Hendrycks & Gimpel's MSP of the calibrated network. In an evaluation T is fitted on the ID validation split
    (``fit(train, val=...)``; the ID test split is never read); standalone, ``fit(calibration_views)`` fits on
    the views given. Ensemble: each member's logits divided by its own T, then averaged (``mean-logits``) or
    their softmaxes averaged (``mean-probs``).

    Class-masked set (ImageNet-A/R): the same T divides the kept logits, ``max softmax(z[kept] / T)``; T is a
    property of the network, fitted on the full head (oodens' choice; the paper and OpenOOD define nothing here).
    """

    name = "tempscale"
    needs_fit = True
    fit_on = ("val",)
    strategies = ("mean-logits", "mean-probs", "mean-scores")

    def fit(self, train: Views | None = None, val: Views | None = None) -> "TempScaledMSP":
        views = val if val is not None else train
        if views is None:
            raise OodensError("tempscale fits its temperature on labelled ID views: expected fit(val=views)")
        z = np.asarray(self._matrix(views, "logits"), dtype=np.float64)
        keep, y = _labelled(views)
        if not keep.any():
            raise OodensError("tempscale fits its temperature on labelled ID views, but these views have no sample "
                              "of a class the network predicts: expected the ID validation split")
        self.temperature_ = fit_temperature(z[keep], y)
        self.n_logits_in_ = z.shape[1]
        return self

    def member_logits(self, views: Views) -> np.ndarray:
        """The member's logits divided by its fitted temperature."""
        check_is_fitted(self)
        z, _ = fitted_logits(self, views, self.n_logits_in_)  # a class-masked set: its kept logits, the same T
        return np.asarray(z, dtype=np.float64) / self.temperature_

    def score_logits(self, z: np.ndarray) -> np.ndarray:
        return softmax(z, axis=1).max(axis=1)
