"""Disagreement detectors: defined on the whole ensemble (no per-member score)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from oodens.detectors.base import Detector, param, register_detector
from oodens.detectors.logit import check_eps_space, entropy, odin_spec
from oodens.errors import OodensError
from oodens.views.types import Views


@dataclass
class EnsembleDetector(Detector):
    family = "disagreement"
    needs = ("logits",)
    strategies = ("ensemble",)
    ensemble_only = True
    classwise_ensemble = True

    def score(self, views: Views) -> np.ndarray:
        raise OodensError(f"{self.name} is defined on an ensemble, not on one member's views: call "
                          f"score_ensemble([views of member 1, views of member 2, ...])")

    def member_logits(self, views: Views) -> np.ndarray:
        """The logits this detector reads for one member (default: the cached logits)."""
        return self._matrix(views, "logits")

    def member_arrays(self, members: list[Views]) -> list[np.ndarray]:
        """Each member's logits (float64), checked: at least one member, the same samples in each."""
        self.validate()
        if isinstance(members, Views) or not len(members):
            raise OodensError(f"{self.name} scores an ensemble: expected a non-empty list of the members' Views")
        zs = [np.asarray(self.member_logits(v), dtype=np.float64) for v in members]
        if len({len(z) for z in zs}) > 1:
            raise OodensError(f"{self.name}: the members' views hold different numbers of samples "
                              f"({', '.join(str(len(z)) for z in zs)}): expected the same samples for every member")
        return zs

    def member_probs(self, members: list[Views], temperature: float = 1.0) -> np.ndarray:
        """softmax(z_n / T) stacked: (N, n, C)."""
        zs = self.member_arrays(members)
        if len({z.shape[1] for z in zs}) > 1:
            raise OodensError(f"{self.name} compares the members class by class, but their logits have "
                              f"{', '.join(str(z.shape[1]) for z in zs)} classes: expected the same classes")
        return np.stack([softmax(z / temperature, axis=1) for z in zs])


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
    """ELOC: ``sum_k [max p_k - H(p_k)]``, p_k = softmax(z_k(x_hat_k) / T) over the classes that
    leave-out member k kept, x_hat_k = x - eps * sign(grad_x CE(z_k(x)/T, argmax z_k(x))) the ODIN
    perturbation of member k from its own gradient on its own kept classes (a zero gradient counted as +1).

    Vyas et al., "Out-of-Distribution Detection Using an Ensemble of Self Supervised
    Leave-out Classifiers", ECCV 2018. T = 1000, eps = 0.002 in pixel space (ELOC's code: eps/std on
    the normalised input; its per-setting table uses 0.001-0.003). ``eps = 0`` scores the members'
    plain logits (the unperturbed variant: no extra view). Needs leave-out members (their
    ``oodens.json`` lists ``kept_classes``).
    """

    name = "eloc"
    classwise_ensemble = False  # each member's own softmax: different kept classes are what it is made for
    temperature: float = param(1000.0, "ELOC temperature T")
    eps: float = param(0.002, "ODIN input perturbation of each member (0 = the plain logits)")
    eps_space: str = param("pixel", "where eps is added: 'pixel' ([0, 1] pixels, ELOC's code) or 'normalized' "
                                    "(the normalised input)")

    def validate(self):
        self._check_positive("temperature")
        self._check_nonnegative("eps")
        check_eps_space(self)
        return self

    def view_specs(self):
        return [odin_spec(self.temperature, self.eps, self.eps_space)] if self.eps > 0 else []

    def member_logits(self, views):
        if self.eps == 0:
            return super().member_logits(views)
        z = np.asarray(self._extra(views, self.view_specs()[0]))
        if z.ndim != 2:
            raise OodensError(f"eloc expects perturbed logits of shape (n, classes), got shape {z.shape}")
        return z

    @classmethod
    def applies_to(cls, members):
        missing = [m.get("name", "?") for m in members if not m.get("kept_classes")]
        if missing:
            return (f"eloc needs leave-out members, but {', '.join(missing)} list no kept_classes in their "
                    f"oodens.json (expected members trained with `oodens train --leave-out K`)")
        return super().applies_to(members)

    def score_ensemble(self, members):
        total = 0.0
        for z in self.member_arrays(members):
            p = softmax(z / self.temperature, axis=1)
            total = total + p.max(axis=1) - entropy(p)
        return total
