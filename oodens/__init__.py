"""oodens: post-hoc ensemble out-of-distribution evaluation of image classifiers.

Data flow (one direction), one subpackage per stage: checkpoints -> modes (``modes``) -> extraction ->
views, cached (``views``) -> ``detectors`` -> ``ensemble`` (strategies, evaluation) -> ``metrics`` ->
``results`` -> ``report``; ``runtime``, ``train`` and ``cli`` stand beside it.

The public API (every ``oodens`` command is a thin caller of it)::

    import oodens
    exp = oodens.Experiment()                      # the shipped digits modes on the embedded benchmark
    res = exp.evaluate(["msp", oodens.detectors.KNN(k=50)], ensemble_sizes="all")
    res.frame(); res.table("fpr95"); res.save()

Registries: :data:`DETECTORS`, :data:`STRATEGIES`, :data:`METRICS`, :data:`ARCHS`, :data:`BENCHMARKS`.
"""

from oodens.version import __version__

from oodens import detectors  # noqa: E402
from oodens.api import (Experiment, ModeSet, ModeViews, OodensWarning, Results, Run, get_benchmark,  # noqa: E402
                        load_modes)
from oodens.archs import ARCHS, create_model  # noqa: E402
from oodens.data import BENCHMARKS  # noqa: E402
from oodens.detectors import DETECTORS  # noqa: E402
from oodens.ensemble.strategies import STRATEGIES  # noqa: E402
from oodens.errors import NotFittedError, OodensError, ParameterError  # noqa: E402
from oodens.metrics.ood import METRICS  # noqa: E402
from oodens.views.types import Views  # noqa: E402

__all__ = ["ARCHS", "BENCHMARKS", "DETECTORS", "METRICS", "STRATEGIES", "Experiment", "ModeSet", "ModeViews",
           "NotFittedError", "OodensError", "OodensWarning", "ParameterError", "Results", "Run", "Views",
           "create_model", "detectors", "get_benchmark", "load_modes"]
