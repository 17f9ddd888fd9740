"""Feature-geometry detectors fitted on the ID training features and the final layer (RMDS, Residual, NECO, NCI, fDBD, SHE, NNGuide, Relation).
"""

from __future__ import annotations
