"""Mode-ensemble strategies (DESIGN.md section 6): how members become one ensemble score.

Three kinds:
- member strategies combine the members' already-fitted detectors:
  ``mean-logits`` (average each member's logits, as that detector reads them, then
  score: plain logits, ODIN/RankFeat views, DICE/ReAct/ASH-shaped logits; GradNorm
  takes its loss on the averaged logits), ``mean-probs`` (average softmax
  probabilities), ``ensemble`` (detectors defined on the whole ensemble: pds, mi, eloc);
- score aggregators combine the members' scores s_1..s_m of each sample (every per-member detector has
  them, without listing them in its ``strategies``): ``mean-scores`` (mean), ``median``, ``min``, ``max``,
  ``std`` (-std_n s_n, population std: members that agree are more ID, SDDE's disagreement score; needs 2
  members), and, standardised per member on its ID-validation scores v_n (so they need validation):
  ``rank`` (mean_n F_n(s_n), F_n the empirical CDF of v_n, #{v <= s}/|v|), ``zscore``
  (mean_n (s_n - mean v_n) / std v_n), ``fisher`` and ``simes`` (p-value fusion: p_n = (1 + #{v_n <= s_n}) /
  (|v_n| + 1), the p-value of "s_n is an ID score", small for OOD; fisher: Fisher's statistic sum_n log p_n,
  whose fused p-value chi2_2m.sf(-2 sum_n log p_n) is an increasing function of it that rounds to 1.0 deep
  inside ID (tying those samples), so the statistic itself is the score; simes: the fused p-value
  min_i p_(i) m / i; higher = more ID throughout);
- refit strategies combine the members' views into one ``Views`` and fit a fresh
  detector on the combined ID-train views: ``concat`` and ``mean-features``.
Which strategies a detector supports: its own ``strategies`` (the first is the default) plus the score
aggregators for every per-member detector (:func:`supported_strategies`).
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


def whole_ensemble(dets: list[Detector], views: list[Views]) -> np.ndarray:
    """The detector's own definition on all members (pds, mi, eloc)."""
    return dets[0].score_ensemble(views)


def _kept(members: list[Views]):
    """The members' kept classes on a class-masked set (the same for every member), else None."""
    kept = [None if v.kept is None else tuple(np.asarray(v.kept).tolist()) for v in members]
    if len(set(kept)) > 1:
        raise OodensError("the members' views keep different classes of a class-masked set: expected one mask")
    return members[0].kept


def concat(members: list[Views], detector: Detector) -> Views:
    """h_ens = [t(h_1), ..., t(h_N)], t the detector's per-member transform (L2 norm for knn); a class-masked set's
    kept classes carried along."""
    return Views(features=np.concatenate([detector.member_features(v.features) for v in members], axis=1),
                 labels=_labels(members), kept=_kept(members))


def mean_features(members: list[Views], detector: Detector) -> Views:
    """h_ens = mean_n h_n (raw features, as the mode-ensemble paper's KNN code); the members' widths must agree."""
    widths = [int(np.shape(v.features)[1]) for v in members]
    if len(set(widths)) > 1:
        raise OodensError(f"strategy 'mean-features' averages the members' features, which needs equal widths, but "
                          f"the members' features are {', '.join(map(str, widths))}-d (a set of mixed "
                          f"architectures): expected concat or mean-scores")
    return Views(features=np.mean([np.asarray(v.features, dtype=np.float32) for v in members], axis=0),
                 labels=_labels(members), kept=_kept(members))


# --------------------------------------------------------------------------- score aggregators
# Each takes the members' scores S (a list of m arrays of n scores, member order) and, for those standardised
# on validation, the members' ID-validation scores V (a list of m arrays); it returns n scores, higher = more ID.


def agg_mean(scores, val=None) -> np.ndarray:
    """mean_n s_n."""
    return np.mean(scores, axis=0)


def agg_median(scores, val=None) -> np.ndarray:
    """median_n s_n."""
    return np.median(scores, axis=0)


def agg_min(scores, val=None) -> np.ndarray:
    """min_n s_n: the least confident member decides."""
    return np.min(scores, axis=0)


def agg_max(scores, val=None) -> np.ndarray:
    """max_n s_n: the most confident member decides."""
    return np.max(scores, axis=0)


def agg_std(scores, val=None) -> np.ndarray:
    """-std_n s_n (population std): members that disagree mark OOD, so higher = more ID."""
    return -np.std(np.asarray(scores, dtype=np.float64), axis=0)


def _sorted_val(val) -> list[np.ndarray]:
    out = [np.sort(np.asarray(v, dtype=np.float64)) for v in val]
    if any(len(v) == 0 for v in out):
        raise OodensError("the ID validation split is empty: expected validation scores for every member")
    return out


def _at_or_below(ref: np.ndarray, s) -> np.ndarray:
    """#{v in ref : v <= s} for each score s (``ref`` sorted)."""
    return np.searchsorted(ref, np.asarray(s, dtype=np.float64), side="right")


def agg_rank(scores, val) -> np.ndarray:
    """mean_n F_n(s_n), F_n(s) = #{v in V_n : v <= s} / |V_n| (each member's ID-validation CDF)."""
    return np.mean([_at_or_below(v, s) / len(v) for s, v in zip(scores, _sorted_val(val))], axis=0)


def agg_zscore(scores, val) -> np.ndarray:
    """mean_n (s_n - mean V_n) / std V_n (population std of each member's ID-validation scores)."""
    out = []
    for i, (s, v) in enumerate(zip(scores, val)):
        v = np.asarray(v, dtype=np.float64)
        sd = float(np.std(v)) if len(v) else 0.0
        if not sd > 0:
            raise OodensError(f"member {i + 1}'s ID-validation scores are {'empty' if not len(v) else 'constant'}: "
                              "zscore needs scores that vary (expected another strategy, e.g. rank)")
        out.append((np.asarray(s, dtype=np.float64) - v.mean()) / sd)
    return np.mean(out, axis=0)


def pvalues(scores, val) -> np.ndarray:
    """(m, n) p-values p_n = (1 + #{v in V_n : v <= s_n}) / (|V_n| + 1): small when s_n is lower than the
    member's ID-validation scores (OOD)."""
    return np.array([(1.0 + _at_or_below(v, s)) / (len(v) + 1.0) for s, v in zip(scores, _sorted_val(val))])


def agg_fisher(scores, val) -> np.ndarray:
    """Fisher's statistic sum_n log p_n: the fused p-value P(chi2_2m >= -2 sum_n log p_n) is an increasing
    function of it (the same ranking), which float64 rounds to 1.0 for small statistics."""
    return np.log(pvalues(scores, val)).sum(axis=0)


def agg_simes(scores, val) -> np.ndarray:
    """Simes' fused p-value: min_i p_(i) m / i, p_(1) <= ... <= p_(m)."""
    p = np.sort(pvalues(scores, val), axis=0)
    m = len(p)
    return np.min(p * m / np.arange(1, m + 1)[:, None], axis=0)


@dataclass(frozen=True)
class Strategy:
    name: str
    #: member strategy: (fitted member detectors, member views) -> scores
    members: Callable[[list[Detector], list[Views]], np.ndarray] | None = None
    #: refit strategy: (member views, detector) -> combined views
    combine: Callable[[list[Views], Detector], Views] | None = None
    #: score aggregator, available to every per-member detector: (member scores, member ID-validation scores
    #: or None) -> scores
    scores: Callable[[list[np.ndarray], list[np.ndarray] | None], np.ndarray] | None = None
    #: reads each member's scores on the ID validation split
    needs_val: bool = False
    #: defined for at least this many members
    min_members: int = 1


#: strategy name -> Strategy. The one registry of strategies.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("mean-logits", members=mean_logits),
        Strategy("mean-probs", members=mean_probs),
        Strategy("mean-scores", scores=agg_mean),
        Strategy("ensemble", members=whole_ensemble),
        Strategy("concat", combine=concat),
        Strategy("mean-features", combine=mean_features),
        Strategy("median", scores=agg_median),
        Strategy("min", scores=agg_min),
        Strategy("max", scores=agg_max),
        Strategy("std", scores=agg_std, min_members=2),
        Strategy("rank", scores=agg_rank, needs_val=True),
        Strategy("zscore", scores=agg_zscore, needs_val=True),
        Strategy("fisher", scores=agg_fisher, needs_val=True),
        Strategy("simes", scores=agg_simes, needs_val=True),
    )
}

#: the score aggregators, in registry order
AGGREGATORS = tuple(n for n, s in STRATEGIES.items() if s.scores is not None)


def supported_strategies(detector_cls: type[Detector], leave_out: bool = False) -> tuple[str, ...]:
    """The strategies a detector supports: its own (the first is its default; for leave-out members those that
    do not compare members class by class) and, for a per-member detector, every score aggregator."""
    own = detector_cls.leave_out_strategies() if leave_out else detector_cls.strategies
    if detector_cls.ensemble_only:
        return tuple(own)
    return tuple(own) + tuple(a for a in AGGREGATORS if a not in own)


def strategies_for(detector_cls: type[Detector], n_members: int, leave_out: bool = False) -> list[str]:
    """``--strategy all``: every strategy the detector supports that is defined for ``n_members`` members."""
    return [s for s in supported_strategies(detector_cls, leave_out) if STRATEGIES[s].min_members <= n_members]


def resolve_strategy(detector_cls: type[Detector], requested: str | None, leave_out: bool = False) -> str:
    """The detector's default strategy, or the requested one if the detector supports it
    (:func:`supported_strategies`).

    ``leave_out``: the members are leave-out members (ELOC) with different kept classes; the default is
    then the detector's first strategy that does not average logits or probabilities class by class
    (``mean-scores`` for logit detectors), and such a strategy asked for explicitly is an error."""
    if requested is not None and requested not in STRATEGIES:
        raise OodensError(f"unknown strategy {requested!r}: expected one of {', '.join(STRATEGIES)} or 'all'")
    if requested is not None and requested not in supported_strategies(detector_cls):
        raise OodensError(
            f"strategy {requested!r} does not apply to detector {detector_cls.name!r}: "
            f"expected one of {', '.join(supported_strategies(detector_cls))}"
        )
    if leave_out:
        allowed = supported_strategies(detector_cls, leave_out=True)
        if not allowed:
            raise OodensError(f"{detector_cls.name} compares the members class by class, but leave-out members "
                              f"predict different subsets of the classes: expected eloc or a per-member detector")
        if requested is not None and requested not in allowed:
            raise OodensError(f"strategy {requested!r} averages the members' logits or probabilities class by class, "
                              f"but leave-out members predict different subsets of the classes: expected "
                              f"{' or '.join(allowed)} for {detector_cls.name}")
        return requested or allowed[0]
    return requested or detector_cls.strategies[0]


def check_members(strategy: str, n_members: int) -> None:
    """An :class:`OodensError` when ``strategy`` is undefined for ``n_members`` members (``std`` of one)."""
    need = STRATEGIES[strategy].min_members
    if n_members < need:
        raise OodensError(f"strategy {strategy!r} is defined for at least {need} members, got {n_members}: "
                          "expected more modes or another strategy")


def ensemble_scores(
    strategy: str,
    make_detector: Callable[[], Detector],
    members: list[Detector],
    train: list[Views],
    evals: dict[str, list[Views]],
    val: list[Views] | None = None,
    member_scores: dict[str, list[np.ndarray]] | None = None,
    val_scores: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Ensemble score of each eval set (keys of ``evals``) under ``strategy``.

    ``members`` are the members' detectors, already fitted on their own ID-train (and validation) views.
    Score aggregators use ``member_scores`` (eval key -> each member's scores) and ``val_scores`` (each
    member's scores on the ID validation split) when given, else score the members on ``evals`` and ``val``
    (the members' ID-validation views); refit strategies fit on the combined ``train`` (and ``val``) views.
    """
    s = STRATEGIES[strategy]
    check_members(strategy, len(members))
    if s.scores is not None:
        if s.needs_val and val_scores is None:
            if val is None:
                raise OodensError(f"strategy {strategy!r} standardises each member's scores on its ID-validation "
                                  "scores: expected the members' ID validation views")
            val_scores = [d.score(v) for d, v in zip(members, val)]
        got = member_scores or {k: [d.score(x) for d, x in zip(members, v)] for k, v in evals.items()}
        return {k: s.scores(got[k], val_scores if s.needs_val else None) for k in evals}
    if s.members is not None:
        return {k: s.members(members, v) for k, v in evals.items()}
    det = make_detector()
    if det.needs_fit:
        det.fit_splits(s.combine(train, det) if det.reads("train") else None,
                       s.combine(val, det) if det.reads("val") else None)
    return {k: det.score(s.combine(v, det)) for k, v in evals.items()}
