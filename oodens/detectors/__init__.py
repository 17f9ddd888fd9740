"""Detectors: one registry (:data:`DETECTORS`), one small class per detector.

Importing this package registers every detector; a new detector is a class with
``@register_detector`` in one of these modules (or a new module imported here),
and the CLI picks it and its hyperparameters up from the registry.
"""

from oodens.detectors.base import DETECTORS, Detector, get_detector, param, parse_detectors, register_detector
from oodens.detectors import logit, feature, shaping, gradient, subspace, disagreement  # noqa: F401,I001  (registers, in table order)

__all__ = ["DETECTORS", "Detector", "get_detector", "param", "parse_detectors", "register_detector"]
