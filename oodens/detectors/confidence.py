"""Logit- and probability-space detectors beyond MSP/energy (GEN, KLM, OpenMax): each reads a member's logits (and, where it fits, the ID-train logits), so its default ensemble strategy averages logits where it scores logits.
"""

from __future__ import annotations
