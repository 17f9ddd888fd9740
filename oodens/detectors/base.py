"""The detector interface (scikit-learn style) and its registry.

A detector turns views into one score per sample, **higher = more in-distribution**.
Its constructor takes hyperparameters only (dataclass fields, each with a ``help``
text, which become ``--<detector>-<param>`` flags of ``oodens eval``); ``fit``
learns state from the ID training views into attributes with a trailing underscore
(``bank_``, ``means_``, ``n_features_in_``...), which exist only once ``fit`` has run;
``score`` never calls a network. Standalone, e.g. in a notebook::

    from oodens.detectors import KNN
    scores = KNN(k=50).fit(train_views).score(test_views)   # oodens.views.Views

``validate()`` checks the hyperparameters that need no data (``ParameterError``); scoring a
detector that needs ``fit`` before fitting raises ``NotFittedError``; scoring features (or
logits) of another width than ``fit`` saw raises ``OodensError``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from oodens.errors import NotFittedError, OodensError, ParameterError
from oodens.views.types import Views, ViewSpec


def param(default: Any, help: str):
    """A detector hyperparameter: its default and its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


#: ensemble strategies that combine members class by class (average their logits or probabilities):
#: undefined for leave-out members, whose heads predict different subsets of the classes
CLASSWISE_STRATEGIES = ("mean-logits", "mean-probs")


def check_is_fitted(detector: "Detector") -> None:
    """Raise :class:`NotFittedError` if ``detector`` needs ``fit`` and has not been fitted.

    As scikit-learn's ``check_is_fitted``: fitted means ``fit`` has set an attribute with a trailing
    underscore (learned state). Detectors that need no fit always pass.
    """
    if not detector.needs_fit:
        return
    if not any(k.endswith("_") and not k.startswith("__") for k in vars(detector)):
        raise NotFittedError(f"{type(detector).__name__} is not fitted: call fit(train_views) first")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


@dataclass
class Detector:
    #: registry name, used on the command line
    name: ClassVar[str]
    #: family, which decides how members are combined (DESIGN.md section 6)
    family: ClassVar[str]
    #: the view arrays ``score`` reads
    needs: ClassVar[tuple[str, ...]] = ("logits",)
    #: whether ``fit`` learns state (scoring before ``fit`` raises :class:`NotFittedError`)
    needs_fit: ClassVar[bool] = False
    #: what ``fit`` reads when ``needs_fit``: ``"train"`` (the ID training views, its first argument) and/or
    #: ``"val"`` (the ID validation views, its ``val`` argument: a temperature calibrated on held-out data).
    #: A detector reading ``"val"`` makes its evaluation use validation: it then fits on ID train minus the
    #: validation hold-out (:meth:`oodens.data.Benchmark.validation`).
    fit_on: ClassVar[tuple[str, ...]] = ("train",)
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

    @classmethod
    def reads(cls, split: str) -> bool:
        """Whether ``fit`` reads the ID ``split`` (``"train"`` or ``"val"``)."""
        return cls.needs_fit and split in cls.fit_on

    def fit_splits(self, train: Views | None, val: Views | None) -> "Detector":
        """``fit`` with the splits it reads (:attr:`fit_on`): ``fit(train)``, or ``fit(train, val=val)`` for a
        detector that reads the ID validation views."""
        return self.fit(train, val=val) if self.reads("val") else self.fit(train)

    def view_specs(self) -> list[ViewSpec]:
        """Views beyond the base view (logits/features/labels) that this detector reads."""
        return []

    def validate(self) -> "Detector":
        """Check the hyperparameters that need no data; raise :class:`ParameterError` naming the
        parameter. Called by ``fit`` and ``score``, and by the CLI before any extraction.
        Default: nothing to check."""
        return self

    def validate_training_size(self, n: int) -> "Detector":
        """Check the hyperparameters that depend only on the number of ID training samples ``n`` (known
        before any extraction); raise :class:`ParameterError`. Default: nothing to check."""
        return self

    def fit(self, train: Views | None = None) -> "Detector":
        """Learn state from the ID training views (detectors with ``needs_fit``); others only
        validate their hyperparameters and need no views."""
        return self.validate()

    def score(self, views: Views) -> np.ndarray:  # pragma: no cover - interface
        """One score per sample of ``views`` (1-D float array), higher = more in-distribution."""
        raise NotImplementedError

    def score_ensemble(self, members: list[Views]) -> np.ndarray:  # pragma: no cover - interface
        """Score of the whole ensemble, for ensemble-only detectors."""
        raise NotImplementedError

    def member_features(self, features: np.ndarray) -> np.ndarray:
        """How one member's features enter a ``concat`` ensemble (identity by default)."""
        return np.asarray(features)

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        """The hyperparameters (constructor fields); learned state lives in trailing-underscore
        attributes set by ``fit``, never in fields."""
        return [f for f in dataclasses.fields(cls) if f.init]

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.params()}

    # ------------------------------------------------------------------ checks shared by the detectors

    def _param_error(self, param: str, problem: str) -> ParameterError:
        """A ParameterError about this detector's ``param`` at its current value."""
        return ParameterError(self.name, param, getattr(self, param), problem)

    def _check_int(self, param: str, minimum: int) -> None:
        """``param`` is an integer >= ``minimum``."""
        v = getattr(self, param)
        if not _is_int(v) or v < minimum:
            raise self._param_error(param, f"is out of range: expected an integer >= {minimum}")

    def _check_positive(self, param: str) -> None:
        """``param`` is a finite number > 0 (a temperature)."""
        v = getattr(self, param)
        if not _is_real(v) or v <= 0:
            raise self._param_error(param, "is out of range: expected a finite number > 0")

    def _check_nonnegative(self, param: str) -> None:
        """``param`` is a finite number >= 0 (a perturbation size)."""
        v = getattr(self, param)
        if not _is_real(v) or v < 0:
            raise self._param_error(param, "is out of range: expected a finite number >= 0")

    def _check_percentile(self, param: str) -> None:
        """``param`` is a percentile in [0, 100)."""
        v = getattr(self, param)
        if not _is_real(v) or not 0 <= v < 100:
            raise self._param_error(param, "is out of range: expected a percentile in [0, 100)")

    def _array(self, views: Views, attr: str) -> np.ndarray:
        """``views.<attr>`` (logits, features, weight...), which must be there."""
        a = getattr(views, attr, None)
        if a is None:
            raise OodensError(f"{self.name} reads views.{attr}, but these views have none "
                              f"(expected Views({attr}=...))")
        return a

    def _extra(self, views: Views, spec: ViewSpec) -> np.ndarray:
        """The logits of a parametrised view (``views.extra[spec.id]``), which must be there."""
        try:
            return views.extra[spec.id]
        except (KeyError, TypeError):
            have = ", ".join(getattr(views, "extra", None) or {}) or "none"
            raise OodensError(f"{self.name} reads the {spec.id} logits view (views.extra[{spec.id!r}]), but these "
                              f"views hold {have}: expected the view extracted with these parameters") from None

    def _matrix(self, views: Views, attr: str, fitted: int | None = None) -> np.ndarray:
        """``views.<attr>`` as an (n, width) array, its width checked against ``fitted`` (what fit saw)."""
        a = self._array(views, attr)
        if np.ndim(a) != 2:
            raise OodensError(f"{self.name} expects {attr} of shape (n, width), got shape {np.shape(a)}")
        self._check_width(a.shape[1], fitted, attr)
        return a

    def _fit_features(self, train: Views) -> np.ndarray:
        """The ID training features (n, D) a feature-fitted detector learns from, hyperparameters validated first."""
        self.validate()
        feats = self._matrix(train, "features")
        if len(feats) == 0:
            raise OodensError(f"{self.name} needs ID training features, but the training views have 0 samples")
        return feats

    def _score_features(self, views: Views) -> np.ndarray:
        """The features to score (n, D), after checking the detector is fitted on D-d features (``n_features_in_``)."""
        check_is_fitted(self)
        self.validate()
        return self._matrix(views, "features", self.n_features_in_)

    def _check_width(self, got: int, fitted: int | None, what: str) -> None:
        if fitted is not None and got != fitted:
            raise OodensError(f"{self.name} was fitted on {fitted}-d {what} but got {got}-d {what}")

    def _head(self, views: Views, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """The final layer (weight (C, D), bias (C,)) as float64, checked against D = ``n_features``."""
        w = np.asarray(self._array(views, "weight"), dtype=np.float64)
        b = np.asarray(self._array(views, "bias"), dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != n_features or b.shape != (w.shape[0],):
            raise OodensError(f"{self.name}: the final layer (weight {w.shape}, bias {b.shape}) does not fit "
                              f"{n_features}-d features: expected weight (C, {n_features}) and bias (C,)")
        return w, b


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
