"""Logit-family detectors: a score computed from (possibly transformed) logits.

Every logit-family detector says which logits it reads for one member
(``member_logits``: the cached logits, or an ODIN / RankFeat view) and how it scores
logits (``score_logits``). The default ensemble strategy ``mean-logits`` averages the
members' logits, then scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax

from oodens.detectors.base import Detector, param, register_detector
from oodens.errors import OodensError
from oodens.views.types import ODIN_EPS_SPACES, Views, ViewSpec


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of probabilities, with 0 log 0 = 0."""
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)


def odin_spec(temperature: float, eps: float, eps_space: str) -> ViewSpec:
    """The ``odin`` view: logits of the perturbed input (:func:`oodens.views.kinds.odin_view`)."""
    return ViewSpec.of("odin", temperature=float(temperature), eps=float(eps), eps_space=str(eps_space))


def check_eps_space(det: Detector) -> None:
    """``det.eps_space`` is one of :data:`~oodens.views.types.ODIN_EPS_SPACES`."""
    if det.eps_space not in ODIN_EPS_SPACES:
        raise det._param_error("eps_space", f"is not a perturbation space: expected {' or '.join(ODIN_EPS_SPACES)}")


def kept_classes(det: Detector, views: Views, n_fitted: int) -> np.ndarray | None:
    """The classes of a class-masked set (``views.kept``: each logit column's index in the full head, see
    :func:`oodens.ensemble.evaluate.mask_views`), checked against the ``n_fitted`` classes ``det``'s per-class state
    was fitted on; None for views of the full head."""
    kept = getattr(views, "kept", None)
    if kept is None:
        return None
    kept = np.asarray(kept)
    if kept.ndim != 1 or not len(kept) or not np.issubdtype(kept.dtype, np.integer):
        raise OodensError(f"{det.name}: views.kept of shape {kept.shape}, dtype {kept.dtype}: expected a non-empty "
                          "1-d array of class indices")
    bad = kept[(kept < 0) | (kept >= n_fitted)]
    if len(bad):
        raise OodensError(f"{det.name} was fitted on {n_fitted} classes, but these class-masked views keep class "
                          f"{int(bad[0])}: expected indices 0..{n_fitted - 1} of the fitted head")
    return kept.astype(np.int64)


def fitted_logits(det: Detector, views: Views, n_fitted: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(views.logits as an (n, width) array, the kept classes or None)``: width ``n_fitted`` (what fit saw) for
    views of the full head, ``len(kept)`` for a class-masked set (:func:`kept_classes`)."""
    kept = kept_classes(det, views, n_fitted)
    return det._matrix(views, "logits", n_fitted if kept is None else len(kept)), kept


@dataclass
class LogitDetector(Detector):
    family = "logit"
    needs = ("logits",)
    strategies = ("mean-logits", "mean-scores")

    def member_logits(self, views: Views) -> np.ndarray:
        """The logits this detector scores for one member (hyperparameters validated first)."""
        self.validate()
        return np.asarray(self._matrix(views, "logits"), dtype=np.float64)

    def score_logits(self, z: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, views: Views) -> np.ndarray:
        return self.score_logits(self.member_logits(views))

    def score_mean_logits(self, z_mean: np.ndarray, members: list["LogitDetector"], views: list[Views]) -> np.ndarray:
        """Ensemble score from the members' averaged logits (``mean-logits``)."""
        return self.score_logits(z_mean)


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

    def score_logits(self, z):
        return softmax(z, axis=1).max(axis=1)


@register_detector
@dataclass
class MaxLogit(LogitDetector):
    """Maximum logit: ``max_c z_c``.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022.
    """

    name = "maxlogit"

    def score_logits(self, z):
        return z.max(axis=1)


@register_detector
@dataclass
class Energy(LogitDetector):
    """Negative free energy: ``T * logsumexp(z / T)`` (T = 1).

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    name = "energy"
    temperature: float = param(1.0, "energy temperature T")

    def validate(self):
        self._check_positive("temperature")
        return self

    def score_logits(self, z):
        t = self.temperature
        return t * logsumexp(z / t, axis=1)


@register_detector
@dataclass
class Entropy(LogitDetector):
    """Negative predictive entropy: ``-H(softmax(z)) = sum_c p_c log p_c``.

    With ``mean-probs`` this is -H(p_bar), the ensemble's total uncertainty
    (Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles", NeurIPS 2017).
    """

    name = "entropy"
    strategies = ("mean-logits", "mean-probs", "mean-scores")

    def score_logits(self, z):
        return -entropy(softmax(z, axis=1))


@register_detector
@dataclass
class ODIN(LogitDetector):
    """ODIN: ``max_c softmax(z(x_hat) / T)_c`` with
    ``x_hat = x - eps * sign(grad_x CE(z(x)/T, argmax z(x)))``, a zero gradient counted as +1.

    Liang et al., "Enhancing the Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018. T = 1000, eps = 0.0014 (0 for ImageNet). ``eps_space``:
    ``normalized`` (default) adds eps to the normalised input, as the mode-ensemble paper's,
    DICE's and pytorch-ood's code do; ``pixel`` adds it in [0, 1] pixel units (eps/std on the
    normalised input, 4-5x larger on CIFAR), as ODIN's original code and OpenOOD do. The perturbed
    logits are a view computed at extraction, each member with its own input gradient.
    """

    name = "odin"
    temperature: float = param(1000.0, "ODIN temperature T")
    eps: float = param(0.0014, "ODIN input perturbation (0 = temperature scaling only)")
    eps_space: str = param("normalized", "where eps is added: 'normalized' (the normalised input: the "
                                         "mode-ensemble paper, DICE) or 'pixel' ([0, 1] pixels: ODIN, OpenOOD)")

    def validate(self):
        self._check_positive("temperature")
        self._check_nonnegative("eps")
        check_eps_space(self)
        return self

    def view_specs(self):
        return [odin_spec(self.temperature, self.eps, self.eps_space)]

    def member_logits(self, views):
        self.validate()
        return np.asarray(self._extra(views, self.view_specs()[0]), dtype=np.float64)

    def score_logits(self, z):
        return softmax(z / self.temperature, axis=1).max(axis=1)


@register_detector
@dataclass
class RankFeat(LogitDetector):
    """RankFeat: energy of the mean of two logits, each from a stage map with its rank-1
    part (s1 u1 v1^T) removed: the last stage -> head, and the second-to-last stage ->
    last stage -> head.

    Song et al., "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022. Exact SVD by default; ``--rankfeat-power-iters N`` uses N power
    iterations instead (the paper's fast variant uses 20).
    """

    name = "rankfeat"
    power_iters: int = param(0, "0 = exact SVD; N > 0 = N power iterations for the rank-1 part")

    def validate(self):
        self._check_int("power_iters", 0)
        return self

    def view_specs(self):
        return [ViewSpec.of("rankfeat", power_iters=int(self.power_iters))]

    def member_logits(self, views):
        self.validate()
        return np.asarray(self._extra(views, self.view_specs()[0]), dtype=np.float64)

    def score_logits(self, z):
        return logsumexp(z, axis=1)
