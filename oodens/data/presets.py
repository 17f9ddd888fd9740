"""Preprocessing presets (DESIGN.md section 3).

Preprocessing belongs to how a checkpoint was trained, so it is a named preset
recorded in each mode's sidecar and part of every view's cache key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from oodens.errors import OodensError


@dataclass(frozen=True)
class Preset:
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None  # shorter side, before the optional center crop
    crop: int | None = None

    def identity(self) -> dict:
        return asdict(self)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel for a batch in [0, 1], NCHW."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # digits: pixel mean / std of the ID training split (values in [0, 1]).
        Preset("digits", mean=(0.3045,), std=(0.3770,)),
        Preset("cifar", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), resize=32),
        Preset("cifar-dice", mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), resize=32),
        Preset("cifar-eloc", mean=(125.3 / 255, 123.0 / 255, 113.9 / 255), std=(63.0 / 255, 62.1 / 255, 66.7 / 255)),
        Preset("imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=256, crop=224),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise OodensError(f"unknown preprocessing preset {name!r}: expected one of {', '.join(PRESETS)}") from None
