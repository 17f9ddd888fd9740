"""The mode ensemble: strategies that combine members into one score (:mod:`oodens.ensemble.strategies`)
and the scoring of a detector on a mode set, members, ensemble and subsets (:mod:`oodens.ensemble.evaluate`)."""

from oodens.ensemble.evaluate import (DetectorRun, MemberSet, Quality, Sweep, evaluate_detector,
                                      score_ensemble, score_members, subsets)
from oodens.ensemble.strategies import STRATEGIES, Strategy, ensemble_scores, resolve_strategy

__all__ = ["DetectorRun", "MemberSet", "Quality", "STRATEGIES", "Strategy", "Sweep", "ensemble_scores",
           "evaluate_detector", "resolve_strategy", "score_ensemble", "score_members", "subsets"]
