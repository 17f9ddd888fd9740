"""Mode-ensemble strategies (DESIGN.md section 6): how members become one ensemble score.

Two kinds:
- member strategies combine the members' already-fitted detectors:
  ``mean-logits`` (average each member's logits, as that detector reads them, then
  score: plain logits, ODIN/RankFeat views, DICE/ReAct/ASH-shaped logits; GradNorm
  takes its loss on the averaged logits), ``mean-probs`` (average softmax
  probabilities), ``mean-scores`` (average the members' scores), ``ensemble``
  (detectors defined on the whole ensemble: pds, mi, eloc);
- refit strategies combine the members' views into one ``Views`` and fit a fresh
  detector on the combined ID-train views: ``concat`` and ``mean-features``.
Which strategies a detector supports is declared by the detector (its first is the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import softmax

from oodens.detectors import Detector
from oodens.errors import OodensError
from oodens.views.types import Views


def _labels(members: list[Views]):
    return members[0].labels


def mean_logits(dets: list[Detector], views: list[Views]) -> np.ndarray:
    """score(mean_n z_n), z_n the logits member n's detector reads."""
    z = np.mean([d.member_logits(v) for d, v in zip(dets, views)], axis=0)
    return dets[0].score_mean_logits(z, dets, views)


def mean_probs(dets: list[Detector], views: list[Views]) -> np.ndarray:
    """score(log mean_n softmax(z_n)): softmax(log p_bar) = p_bar."""
    p = np.mean([softmax(d.member_logits(v), axis=1) for d, v in zip(dets, views)], axis=0)
    return dets[0].score_logits(np.log(np.maximum(p, np.finfo(np.float64).tiny)))


def mean_scores(dets: list[Detector], views: list[Views]) -> np.ndarray:
    """mean_n s_n."""
    return np.mean([d.score(v) for d, v in zip(dets, views)], axis=0)


def whole_ensemble(dets: list[Detector], views: list[Views]) -> np.ndarray:
    """The detector's own definition on all members (pds, mi, eloc)."""
    return dets[0].score_ensemble(views)


def concat(members: list[Views], detector: Detector) -> Views:
    """h_ens = [t(h_1), ..., t(h_N)], t the detector's per-member transform (L2 norm for knn)."""
    return Views(features=np.concatenate([detector.member_features(v.features) for v in members], axis=1),
                 labels=_labels(members))


def mean_features(members: list[Views], detector: Detector) -> Views:
    """h_ens = mean_n h_n (raw features, as the mode-ensemble paper's KNN code)."""
    return Views(features=np.mean([np.asarray(v.features, dtype=np.float32) for v in members], axis=0),
                 labels=_labels(members))


@dataclass(frozen=True)
class Strategy:
    name: str
    #: member strategy: (fitted member detectors, member views) -> scores
    members: Callable[[list[Detector], list[Views]], np.ndarray] | None = None
    #: refit strategy: (member views, detector) -> combined views
    combine: Callable[[list[Views], Detector], Views] | None = None


#: strategy name -> Strategy. The one registry of strategies.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("mean-logits", members=mean_logits),
        Strategy("mean-probs", members=mean_probs),
        Strategy("mean-scores", members=mean_scores),
        Strategy("ensemble", members=whole_ensemble),
        Strategy("concat", combine=concat),
        Strategy("mean-features", combine=mean_features),
    )
}


def resolve_strategy(detector_cls: type[Detector], requested: str | None, leave_out: bool = False) -> str:
    """The detector's default strategy, or the requested one if the detector supports it.

    ``leave_out``: the members are leave-out members (ELOC) with different kept classes; the default is
    then the detector's first strategy that does not average logits or probabilities class by class
    (``mean-scores`` for logit detectors), and such a strategy asked for explicitly is an error."""
    if requested is not None and requested not in STRATEGIES:
        raise OodensError(f"unknown strategy {requested!r}: expected one of {', '.join(STRATEGIES)}")
    if requested is not None and requested not in detector_cls.strategies:
        raise OodensError(
            f"strategy {requested!r} does not apply to detector {detector_cls.name!r}: "
            f"expected one of {', '.join(detector_cls.strategies)}"
        )
    if leave_out:
        allowed = detector_cls.leave_out_strategies()
        if not allowed:
            raise OodensError(f"{detector_cls.name} compares the members class by class, but leave-out members "
                              f"predict different subsets of the classes: expected eloc or a per-member detector")
        if requested is not None and requested not in allowed:
            raise OodensError(f"strategy {requested!r} averages the members' logits or probabilities class by class, "
                              f"but leave-out members predict different subsets of the classes: expected "
                              f"{' or '.join(allowed)} for {detector_cls.name}")
        return requested or allowed[0]
    return requested or detector_cls.strategies[0]


def ensemble_scores(
    strategy: str,
    make_detector: Callable[[], Detector],
    members: list[Detector],
    train: list[Views],
    evals: dict[str, list[Views]],
) -> dict[str, np.ndarray]:
    """Ensemble score of each eval set (keys of ``evals``) under ``strategy``.

    ``members`` are the members' detectors, already fitted on their own ID-train views.
    """
    s = STRATEGIES[strategy]
    if s.members is not None:
        return {k: s.members(members, v) for k, v in evals.items()}
    det = make_detector()
    if det.needs_fit:
        det.fit(s.combine(train, det))
    return {k: det.score(s.combine(v, det)) for k, v in evals.items()}
