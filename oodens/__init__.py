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

The names below are imported on first use (PEP 562), so that ``import oodens`` (and with it the ``oodens``
command's start-up, where Ctrl-C must print one line) does not import torch before the command runs.
"""

from importlib import import_module

from oodens.errors import NotFittedError, OodensError, OodensWarning, ParameterError  # noqa: F401
from oodens.version import __version__  # noqa: F401

#: public name -> the module that defines it
_LAZY = {
    "detectors": None,  # the subpackage itself
    "Experiment": "oodens.api", "ModeSet": "oodens.api", "ModeViews": "oodens.api", "Results": "oodens.api",
    "Run": "oodens.api", "get_benchmark": "oodens.api", "load_modes": "oodens.api",
    "ARCHS": "oodens.archs", "create_model": "oodens.archs",
    "BENCHMARKS": "oodens.data",
    "DETECTORS": "oodens.detectors",
    "STRATEGIES": "oodens.ensemble.strategies",
    "METRICS": "oodens.metrics.ood",
    "Views": "oodens.views.types",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'oodens' has no attribute {name!r}")
    value = import_module(f"oodens.{name}") if _LAZY[name] is None else getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "ARCHS", "BENCHMARKS", "DETECTORS", "METRICS", "STRATEGIES", "Experiment", "ModeSet", "ModeViews",
           "NotFittedError", "OodensError", "OodensWarning", "ParameterError", "Results", "Run", "Views",
           "create_model", "detectors", "get_benchmark", "load_modes"]
