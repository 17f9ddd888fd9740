"""Calling the library's per-detector evaluation from tests by registry name, and naming record rows."""

from oodens.detectors import get_detector
from oodens.ensemble.evaluate import MemberSet, Sweep, evaluate_detector


def evaluate_named(name, params, strategy, members, train, id_test, oods, positive="id", ensemble_sizes=(),
                   max_subsets=100, seed=0, kinds=None):
    """evaluate_detector on a registry name + hyperparameters and per-member view lists."""
    return evaluate_detector(get_detector(name)(**params), MemberSet(list(members), train, id_test, oods, kinds or {}),
                             strategy, positive, Sweep(list(ensemble_sizes), max_subsets, seed))


def row(r) -> str:
    """A record's row as one string: the member's name, or ``subsets-<k>-<stat>`` for the ensemble-size sweep."""
    return f"subsets-{r['k']}-{r['stat']}" if r.get("role") == "subsets" else r["member"]
