"""Detectors on views beyond the penultimate layer (multi-layer pooled features: multi-layer Mahalanobis, Gram matrices).
"""

from __future__ import annotations
