"""Preprocessing presets (DESIGN.md section 3).

Preprocessing belongs to how a checkpoint was trained, so it is a named preset
recorded in each mode's sidecar and part of every view's cache key.
"""

from __future__ import annotations

import math
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
        # OpenOOD v1.5's CIFAR-100 normalisation (evaluation_api/preprocessor.py); its CIFAR-10 and ImageNet(-200)
        # preprocessing (resize 32; resize 256, centre crop 224) has the values of "cifar" and "imagenet"
        Preset("openood-cifar100", mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761), resize=32),
    )
}


def timm_preset(model: str) -> Preset:
    """The evaluation preprocessing timm's ``pretrained_cfg`` gives ``model`` (static metadata, no download): resize
    the shorter side to floor(size / crop_pct), centre-crop ``size``, the cfg's mean and std."""
    try:
        import timm
    except ImportError:
        raise OodensError(f"preset timm:{model} needs timm: pip install 'oodens[timm]'") from None
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:
        cfg = None
    if cfg is None:
        raise OodensError(f"preset timm:{model}: timm has no pretrained_cfg for {model!r} (expected a model name "
                          f"of timm.list_models())")
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    return Preset(f"timm:{model}", tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std),
                  resize=int(math.floor(size / crop_pct)), crop=size)


#: preset name prefix -> resolver(the rest of the name): presets that travel with a model library
PRESET_FAMILIES = {"timm": timm_preset}


def get_preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    family, sep, rest = str(name).partition(":")
    if sep and family in PRESET_FAMILIES:
        return PRESET_FAMILIES[family](rest)
    raise OodensError(f"unknown preprocessing preset {name!r}: expected one of {', '.join(PRESETS)} or "
                      f"timm:<model> (its pretrained_cfg)")
