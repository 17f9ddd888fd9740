"""Detectors: one registry (:data:`DETECTORS`), one small class per detector.

Importing this package registers every detector; a new detector is a class with
``@register_detector`` in one of these modules (or a new module imported here),
and the CLI picks it and its hyperparameters up from the registry.

Each detector is a scikit-learn-style estimator, usable on its own::

    from oodens.detectors import KNN
    scores = KNN(k=50).fit(train_views).score(test_views)   # oodens.views.Views; higher = more ID

The classes are exported by name below; ``DETECTORS`` maps registry names to the same classes.
"""

from oodens.detectors.base import (DETECTORS, Detector, check_is_fitted, get_detector, param, parse_detectors,
                                   register_detector)
from oodens.detectors import logit, feature, shaping, gradient, subspace, disagreement  # noqa: F401,I001  (registers, in table order)
from oodens.detectors import confidence, geometry, temperature, layers  # noqa: F401,I001
from oodens.detectors.heads import Distinct, EnsembleConfidence  # noqa: I001  (SED's ensemble-only scores)
from oodens.detectors.logit import MSP, ODIN, Energy, Entropy, MaxLogit, RankFeat
from oodens.detectors.feature import KNN, RMDS, Mahalanobis
from oodens.detectors.layers import Gram, MultiLayerMahalanobis
from oodens.detectors.geometry import FDBD, NCI, NECO, SHE, NNGuide, Relation, Residual
from oodens.detectors.shaping import ASH, ASHB, ASHP, DICE, VRA, ReAct, ReActDICE, Scale
from oodens.detectors.confidence import GEN, KLMatching, OpenMax
from oodens.detectors.gradient import GradNorm
from oodens.detectors.temperature import TempScaledMSP
from oodens.detectors.subspace import ViM
from oodens.detectors.disagreement import ELOC, MI, PDS
from oodens.errors import NotFittedError, ParameterError

__all__ = [
    "DETECTORS", "Detector", "check_is_fitted", "get_detector", "param", "parse_detectors", "register_detector",
    "NotFittedError", "ParameterError",
    # the detectors, in registry order
    "MSP", "MaxLogit", "Energy", "Entropy", "ODIN", "RankFeat", "KNN", "Mahalanobis", "DICE", "ReAct", "ASH",
    "GradNorm", "ViM", "PDS", "MI", "ELOC",
    "ReActDICE", "VRA", "ASHP", "ASHB", "Scale", "GEN", "KLMatching", "OpenMax",
    "RMDS", "Residual", "NECO", "NCI", "FDBD", "SHE", "NNGuide", "Relation", "MultiLayerMahalanobis", "Gram",
    "TempScaledMSP", "Distinct", "EnsembleConfidence",
]
