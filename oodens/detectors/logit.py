"""Logit-family detectors: scores computed from the logits alone.

Default ensemble strategy ``mean-logits``: average the members' logits, then score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax

from oodens.detectors.base import Detector, param, register_detector
from oodens.views import Views


@dataclass
class LogitDetector(Detector):
    family = "logit"
    needs = ("logits",)
    strategies = ("mean-logits", "mean-scores")


@register_detector
@dataclass
class MSP(LogitDetector):
    """Maximum softmax probability: ``max_c softmax(z)_c``.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017.
    ``mean-probs`` scores the ensemble's averaged probabilities (deep-ensemble style).
    """

    name = "msp"
    strategies = ("mean-logits", "mean-probs", "mean-scores")

    def score(self, views: Views) -> np.ndarray:
        return softmax(np.asarray(views.logits, dtype=np.float64), axis=1).max(axis=1)


@register_detector
@dataclass
class MaxLogit(LogitDetector):
    """Maximum logit: ``max_c z_c``.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022.
    """

    name = "maxlogit"

    def score(self, views: Views) -> np.ndarray:
        return np.asarray(views.logits, dtype=np.float64).max(axis=1)


@register_detector
@dataclass
class Energy(LogitDetector):
    """Negative free energy: ``T * logsumexp(z / T)`` (T = 1).

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    name = "energy"
    temperature: float = param(1.0, "energy temperature T")

    def score(self, views: Views) -> np.ndarray:
        t = self.temperature
        return t * logsumexp(np.asarray(views.logits, dtype=np.float64) / t, axis=1)
