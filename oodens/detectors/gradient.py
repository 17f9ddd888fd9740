"""Gradient-based detectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from oodens.detectors.base import param, register_detector
from oodens.detectors.logit import LogitDetector
from oodens.views.types import Views


@register_detector
@dataclass
class GradNorm(LogitDetector):
    """GradNorm: ``||dL/dW||_1`` of the final layer with ``L = sum_c -log softmax(z/T)_c``,
    in closed form ``(1/T) ||C p - 1||_1 ||h||_1`` (p = softmax(z/T)): no backward pass.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional
    Shifts in the Wild", NeurIPS 2021. T = 1.
    Ensemble (``mean-logits``): L on the averaged logits z_bar = mean_n z_n, and the mean
    over members of ``||dL/dW_n||_1 = (1/N) (1/T) ||C p_bar - 1||_1 ||h_n||_1``.
    """

    name = "gradnorm"
    family = "gradient"
    needs = ("logits", "features")
    temperature: float = param(1.0, "GradNorm temperature T")

    def validate(self):
        self._check_positive("temperature")
        return self

    def _logit_factor(self, z: np.ndarray) -> np.ndarray:
        t = self.temperature
        p = softmax(z / t, axis=1)
        return np.abs(z.shape[1] * p - 1.0).sum(axis=1) / t

    def score(self, views: Views) -> np.ndarray:
        z = self.member_logits(views)
        h1 = np.abs(np.asarray(self._matrix(views, "features"), dtype=np.float64)).sum(axis=1)
        return self._logit_factor(z) * h1

    def score_mean_logits(self, z_mean, members, views):
        n = len(views)
        self.validate()
        h1 = np.mean([np.abs(np.asarray(self._matrix(v, "features"), dtype=np.float64)).sum(axis=1) for v in views],
                     axis=0)
        return self._logit_factor(z_mean) * h1 / n
