"""The detector interface (scikit-learn style) and its registry.

A detector turns views into one score per sample, **higher = more in-distribution**.
Its constructor takes hyperparameters only (dataclass fields, each with a ``help``
text, which become ``--<detector>-<param>`` flags of ``oodens eval``); ``fit``
learns state from the ID training views; ``score`` never calls a network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from oodens.errors import OodensError
from oodens.views import Views, ViewSpec


def param(default: Any, help: str):
    """A detector hyperparameter: its default and its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


#: ensemble strategies that combine members class by class (average their logits or probabilities):
#: undefined for leave-out members, whose heads predict different subsets of the classes
CLASSWISE_STRATEGIES = ("mean-logits", "mean-probs")


@dataclass
class Detector:
    #: registry name, used on the command line
    name: ClassVar[str]
    #: family, which decides how members are combined (DESIGN.md section 6)
    family: ClassVar[str]
    #: the view arrays ``score`` reads
    needs: ClassVar[tuple[str, ...]] = ("logits",)
    #: whether ``fit`` needs the ID training views
    needs_fit: ClassVar[bool] = False
    #: the ensemble strategies this detector supports; the first is the default
    strategies: ClassVar[tuple[str, ...]] = ()
    #: defined on the whole ensemble only (no per-member scores)
    ensemble_only: ClassVar[bool] = False
    #: an ensemble-only score that compares the members class by class (pds, mi)
    classwise_ensemble: ClassVar[bool] = False

    @classmethod
    def leave_out_strategies(cls) -> tuple[str, ...]:
        """The strategies that apply to leave-out members (ELOC), whose heads predict different class
        subsets: every strategy but those averaging logits or probabilities class by class."""
        if cls.ensemble_only:
            return () if cls.classwise_ensemble else cls.strategies
        return tuple(s for s in cls.strategies if s not in CLASSWISE_STRATEGIES)

    @classmethod
    def applies_to(cls, members: list[dict]) -> str | None:
        """None if the detector applies to these members (their sidecars), else why not."""
        if cls.ensemble_only and len(members) < 2:
            return f"{cls.name} is defined on an ensemble: expected at least 2 modes, got {len(members)}"
        if any(m.get("kept_classes") for m in members) and not cls.leave_out_strategies():
            return (f"{cls.name} compares the members class by class, but leave-out members (kept_classes in "
                    f"their oodens.json) predict different subsets of the classes: expected eloc, or a "
                    f"per-member detector (its mean-scores/concat ensemble)")
        return None

    def view_specs(self) -> list[ViewSpec]:
        """Views beyond the base view (logits/features/labels) that this detector reads."""
        return []

    def fit(self, train: Views) -> "Detector":
        return self

    def score(self, views: Views) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def score_ensemble(self, members: list[Views]) -> np.ndarray:  # pragma: no cover - interface
        """Score of the whole ensemble, for ensemble-only detectors."""
        raise NotImplementedError

    def member_features(self, features: np.ndarray) -> np.ndarray:
        """How one member's features enter a ``concat`` ensemble (identity by default)."""
        return np.asarray(features)

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        """The hyperparameters (constructor fields); learned state lives in ``init=False`` fields."""
        return [f for f in dataclasses.fields(cls) if f.init]

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.params()}


#: name -> detector class. The one registry of detectors.
DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    if cls.name in DETECTORS:
        raise ValueError(f"detector {cls.name!r} registered twice")
    DETECTORS[cls.name] = cls
    return cls


def get_detector(name: str) -> type[Detector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise OodensError(f"unknown detector {name!r}: expected one of {', '.join(DETECTORS)} or 'all'") from None


def parse_detectors(spec: str) -> list[str]:
    """``msp``, ``msp,knn`` or ``all`` -> registry names, validated, in order."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise OodensError("--detector is empty: expected a detector name, a comma-separated list, or 'all'")
    if names == ["all"]:
        return list(DETECTORS)
    for n in names:
        get_detector(n)
    return list(dict.fromkeys(names))
