"""SED's ensemble-only scores beyond ``pds`` (:mod:`oodens.detectors.disagreement`): the number of distinct
predictions and the ensemble's confidence. Defined on any ensemble of members with the same classes; SED scores
its diversified heads on one frozen backbone with them (``oodens train-heads``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oodens.detectors.base import register_detector
from oodens.detectors.disagreement import EnsembleDetector


def distinct_count(argmax: np.ndarray) -> np.ndarray:
    """Per sample, the number of distinct values in each column of ``argmax`` (N members x n samples)."""
    a = np.sort(np.asarray(argmax), axis=0)
    return 1 + np.count_nonzero(np.diff(a, axis=0), axis=0)


@register_detector
@dataclass
class Distinct(EnsembleDetector):
    """Number of distinct predictions: ``-|{argmax_c z_n,c : n = 1..N}|`` (1 when every member predicts the same
    class, up to min(N, C); lower count = more ID, so the score is its negation). Ties between samples are
    many (the count takes N values at most): AUROC counts them half.

    Rubinstein et al. (SED), "Scalable Ensemble Diversification for OOD Generalization and Detection", 2024.
    """

    name = "distinct"

    def score_ensemble(self, members):
        zs = self.member_arrays(members)
        return -distinct_count(np.stack([z.argmax(axis=1) for z in zs])).astype(np.float64)


@register_detector
@dataclass
class EnsembleConfidence(EnsembleDetector):
    """The ensemble's confidence: ``max_c p̄_c``, p̄ = mean_n softmax(z_n) (the maximum of the members' mean
    predictive distribution; the same numbers as ``msp`` with the ``mean-probs`` strategy, as an ensemble-only
    score next to pds and distinct).

    Rubinstein et al. (SED), "Scalable Ensemble Diversification for OOD Generalization and Detection", 2024;
    Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", 2017.
    """

    name = "ensemble-confidence"

    def score_ensemble(self, members):
        return self.member_probs(members).mean(axis=0).max(axis=1)
