"""Disagreement detectors: defined on the whole ensemble (no per-member score)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from oodens.detectors.base import Detector, param, register_detector
from oodens.detectors.logit import entropy
from oodens.views import Views


@dataclass
class EnsembleDetector(Detector):
    family = "disagreement"
    needs = ("logits",)
    strategies = ("ensemble",)
    ensemble_only = True
    classwise_ensemble = True

    @staticmethod
    def member_probs(members: list[Views], temperature: float = 1.0) -> np.ndarray:
        """softmax(z_n / T) stacked: (N, n, C)."""
        return np.stack([softmax(np.asarray(v.logits, dtype=np.float64) / temperature, axis=1) for v in members])


@register_detector
@dataclass
class PDS(EnsembleDetector):
    """Predictive diversity score: ``-sum_c max_n softmax(z_n)_c`` (1 when all members
    agree on one class with certainty; up to N when they disagree).

    Rubinstein et al. (SED), "Scalable Ensemble Diversification for OOD Generalization
    and Detection", 2024.
    """

    name = "pds"

    def score_ensemble(self, members):
        return -self.member_probs(members).max(axis=0).sum(axis=1)


@register_detector
@dataclass
class MI(EnsembleDetector):
    """Negative mutual information between prediction and member:
    ``-(H(p_bar) - mean_n H(p_n))`` (epistemic uncertainty of the ensemble).

    Depeweg et al., "Decomposition of Uncertainty in Bayesian Deep Learning", ICML 2018;
    Malinin & Gales, "Predictive Uncertainty Estimation via Prior Networks", NeurIPS 2018.
    """

    name = "mi"

    def score_ensemble(self, members):
        p = self.member_probs(members)
        return -(entropy(p.mean(axis=0)) - np.mean([entropy(pn) for pn in p], axis=0))


@register_detector
@dataclass
class ELOC(EnsembleDetector):
    """ELOC: ``sum_k [max p_k - H(p_k)]``, p_k = softmax(z_k / T) over the classes that
    leave-out member k kept.

    Vyas et al., "Out-of-Distribution Detection Using an Ensemble of Self Supervised
    Leave-out Classifiers", ECCV 2018. T = 1000. Needs leave-out members (their
    ``oodens.json`` lists ``kept_classes``).
    """

    name = "eloc"
    classwise_ensemble = False  # each member's own softmax: different kept classes are what it is made for
    temperature: float = param(1000.0, "ELOC temperature T")

    @classmethod
    def applies_to(cls, members):
        missing = [m.get("name", "?") for m in members if not m.get("kept_classes")]
        if missing:
            return (f"eloc needs leave-out members, but {', '.join(missing)} list no kept_classes in their "
                    f"oodens.json (expected members trained with `oodens train --leave-out K`)")
        return super().applies_to(members)

    def score_ensemble(self, members):
        total = 0.0
        for v in members:
            p = softmax(np.asarray(v.logits, dtype=np.float64) / self.temperature, axis=1)
            total = total + p.max(axis=1) - entropy(p)
        return total
