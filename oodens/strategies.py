"""Mode-ensemble strategies (DESIGN.md section 6): how members become one ensemble score.

Two kinds:
- view strategies combine the members' views into one ``Views`` and a fresh
  detector is fitted and scored on it (``mean-logits``, ``mean-probs``, ``concat``,
  ``mean-features``);
- ``mean-scores`` averages the members' own scores.
Which strategies a detector supports is declared by the detector (its first is the default).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.special import softmax

from oodens.detectors import Detector
from oodens.errors import OodensError
from oodens.views import Views

Combine = Callable[[list[Views], Detector], Views]


def _labels(members: list[Views]):
    return members[0].labels


def mean_logits(members: list[Views], detector: Detector) -> Views:
    """z_ens = mean_n z_n."""
    return Views(logits=np.mean([np.asarray(v.logits, dtype=np.float64) for v in members], axis=0), labels=_labels(members))


def mean_probs(members: list[Views], detector: Detector) -> Views:
    """p_ens = mean_n softmax(z_n), passed on as logits log p_ens (softmax(log p) = p)."""
    p = np.mean([softmax(np.asarray(v.logits, dtype=np.float64), axis=1) for v in members], axis=0)
    return Views(logits=np.log(np.maximum(p, np.finfo(np.float64).tiny)), labels=_labels(members))


def concat(members: list[Views], detector: Detector) -> Views:
    """h_ens = [t(h_1), ..., t(h_N)], t the detector's per-member transform (L2 norm for knn)."""
    return Views(
        features=np.concatenate([detector.member_features(v.features) for v in members], axis=1),
        labels=_labels(members),
    )


def mean_features(members: list[Views], detector: Detector) -> Views:
    """h_ens = mean_n h_n (raw features, as the mode-ensemble paper's KNN code)."""
    return Views(features=np.mean([np.asarray(v.features, dtype=np.float32) for v in members], axis=0), labels=_labels(members))


#: strategy name -> view combiner; ``mean-scores`` is the score-level strategy (None).
STRATEGIES: dict[str, Combine | None] = {
    "mean-logits": mean_logits,
    "mean-probs": mean_probs,
    "concat": concat,
    "mean-features": mean_features,
    "mean-scores": None,
}


def resolve_strategy(detector_cls: type[Detector], requested: str | None) -> str:
    """The detector's default strategy, or the requested one if the detector supports it."""
    if requested is None:
        return detector_cls.strategies[0]
    if requested not in STRATEGIES:
        raise OodensError(f"unknown strategy {requested!r}: expected one of {', '.join(STRATEGIES)}")
    if requested not in detector_cls.strategies:
        raise OodensError(
            f"strategy {requested!r} does not apply to detector {detector_cls.name!r}: "
            f"expected one of {', '.join(detector_cls.strategies)}"
        )
    return requested


def ensemble_scores(
    strategy: str,
    make_detector: Callable[[], Detector],
    train: list[Views],
    evals: dict[str, list[Views]],
    member_scores: dict[str, list[np.ndarray]],
) -> dict[str, np.ndarray]:
    """Ensemble score of each eval set (keys of ``evals``) under ``strategy``."""
    combine = STRATEGIES[strategy]
    if combine is None:
        return {k: np.mean(np.stack(v), axis=0) for k, v in member_scores.items()}
    det = make_detector()
    if det.needs_fit:
        det.fit(combine(train, det))
    return {k: det.score(combine(v, det)) for k, v in evals.items()}
