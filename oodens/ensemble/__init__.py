"""The mode ensemble: strategies that combine members into one score (:mod:`oodens.ensemble.strategies`)
and the scoring of a detector on a mode set, members, ensemble and subsets (:mod:`oodens.ensemble.evaluate`)."""

from oodens.ensemble.evaluate import (Candidate, DetectorRun, MemberSet, Quality, Selection, Sweep,
                                      evaluate_detector, subsets)
from oodens.ensemble.strategies import (STRATEGIES, Strategy, ensemble_scores, resolve_strategy,
                                        supported_strategies)

__all__ = ["Candidate", "DetectorRun", "MemberSet", "Quality", "STRATEGIES", "Selection", "Strategy", "Sweep",
           "ensemble_scores", "evaluate_detector", "resolve_strategy", "subsets", "supported_strategies"]
