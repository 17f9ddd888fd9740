"""Detectors fitted on the ID validation split (temperature-scaled MSP).
"""

from __future__ import annotations
