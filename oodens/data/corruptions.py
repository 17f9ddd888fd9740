"""Covariate shift: corrupted copies of an ID test set at severities 1-5.

Corruptions and their severity parameters follow ImageNet-C (Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019). Each works on one image as float HWC in [0, 1] before the preset's
normalisation, is deterministic (seeded by corruption, severity and image index), and
keeps the ID labels, so a corrupted set serves both covariate-shift detection (as an
OOD set) and accuracy under shift (OOD generalisation). Set names are
``<id>-C/<corruption>-<severity>``; C-1 ... C-5 average over corruptions per severity.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from functools import partial
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from torch.utils.data import DataLoader

from oodens.data.presets import Preset
from oodens.data.sources import DataSource, _Items, to_image
from oodens.errors import OodensError

SEVERITIES = (1, 2, 3, 4, 5)


def _rng(name: str, severity: int, index: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), severity, index])


def gaussian_noise(x, s, rng):
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def shot_noise(x, s, rng):
    c = (60, 25, 12, 5, 3)[s - 1]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x, s, rng):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    out = x.copy()
    flip = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out[flip & salt], out[flip & ~salt] = 1.0, 0.0
    return out


def gaussian_blur(x, s, rng):
    sigma = (1, 2, 3, 4, 6)[s - 1]
    return np.clip(gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest"), 0, 1)


def brightness(x, s, rng):
    """Add c to the HSV value channel (hue and saturation unchanged)."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]
    v = x.max(axis=2, keepdims=True)
    new_v = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * new_v / np.where(v > 0, v, 1), new_v)


def contrast(x, s, rng):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    m = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - m) * c + m, 0, 1)


def _pil(x):
    a = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def _array(img, channels):
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[:, :, None] if a.ndim == 2 else a[:, :, :channels]


def pixelate(x, s, rng):
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]
    h, w = x.shape[:2]
    img = _pil(x)
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return _array(small.resize((w, h), Image.BOX), x.shape[2])


def jpeg(x, s, rng):
    q = (25, 18, 15, 10, 7)[s - 1]
    buf = io.BytesIO()
    _pil(x).save(buf, "JPEG", quality=q)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        return _array(img.convert("L" if x.shape[2] == 1 else "RGB"), x.shape[2])


#: corruption name -> f(image HWC float in [0, 1], severity, rng) -> image. The one registry of corruptions.
CORRUPTIONS: dict[str, Callable] = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, gaussian_blur, brightness, contrast, pixelate, jpeg)}


def parse_corruptions(spec: str | None) -> list[tuple[str, int]]:
    """``all``, ``gaussian_noise,contrast``, ``jpeg:3`` ... -> (corruption, severity) pairs."""
    if not spec:
        return []
    pairs = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, sev = part.partition(":")
        names = list(CORRUPTIONS) if name == "all" else [name]
        for n in names:
            if n not in CORRUPTIONS:
                raise OodensError(f"unknown corruption {n!r}: expected 'all' or one of {', '.join(CORRUPTIONS)}")
        try:
            sevs = [int(sev)] if sev else list(SEVERITIES)
        except ValueError:
            raise OodensError(f"--corruptions {part!r}: expected NAME or NAME:SEVERITY with severity 1-5") from None
        if any(v not in SEVERITIES for v in sevs):
            raise OodensError(f"--corruptions {part!r}: severity must be 1-5")
        pairs += [(n, v) for n in names for v in sevs]
    return list(dict.fromkeys(pairs))


class CorruptedSource(DataSource):
    """An ID test set under one corruption at one severity (labels kept)."""

    kind = "shift"

    def __init__(self, source: DataSource, corruption: str, severity: int):
        super().__init__(f"{source.name}-C/{corruption}-{severity}", source.split)
        self.source, self.corruption, self.severity = source, corruption, severity
        self.channels = source.channels
        self.fn = CORRUPTIONS[corruption]

    def __len__(self):
        return len(self.source)

    def item(self, i, preset: Preset | None = None):
        """The corrupted i-th image; with ``preset``, corrupted after the preset's resize/crop
        (as ImageNet-C corrupts the 224 x 224 crops)."""
        img, label = self.source.item(i)
        if isinstance(img, torch.Tensor):
            x = img.numpy().transpose(1, 2, 0).astype(np.float64)
        else:
            a = np.asarray(to_image(img, self.channels, preset))
            x = (a[:, :, None] if a.ndim == 2 else a).astype(np.float64) / 255.0
        y = self.fn(x, self.severity, _rng(self.corruption, self.severity, i))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(y, dtype=np.float32).transpose(2, 0, 1))), label

    @property
    def labels(self):
        return self.source.labels

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.source.fingerprint}/{self.corruption}/{self.severity}/v1".encode()).hexdigest()

    def loader(self, preset: Preset, batch_size: int, workers: int = 0) -> DataLoader:
        ds = _Items(len(self), partial(self.item, preset=preset), preset, len(preset.mean))
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
