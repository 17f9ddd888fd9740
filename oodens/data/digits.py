"""The embedded ``digits`` benchmark (DESIGN.md section 4), built offline and deterministically.

- ID: scikit-learn's bundled 8x8 handwritten digits of classes 0-5, split 70/30
  with a fixed stratified split (``random_state=0``).
- near-OOD ``digits-6789``: the digits 6-9.
- far-OOD ``letters``: the 26 capital letters drawn with Pillow's bundled font,
  each with random rotation, scale, shift and stroke width, box-downsampled to
  8x8 and quantised to the 17 grey levels the digits use.
- far-OOD ``noise``: uniform random images on the same 17 grey levels.
- OOD validation sets ``letters-val`` and ``noise-val`` (for hyperparameter selection): the same generators
  with other seeds, so they are never an evaluated set; the ID validation split is the generic hold-out of
  ID train (:func:`oodens.data.sources.stratified_holdout`).

All images are float32 in [0, 1] with shape (N, 1, 8, 8).
"""

from __future__ import annotations

import string

import numpy as np


ID_CLASSES = (0, 1, 2, 3, 4, 5)
TEST_FRACTION = 0.3
SPLIT_SEED = 0
N_FAR = 720  # size of each far-OOD set, about the size of digits-6789
LEVELS = 16  # digits pixels are integers 0..16


def _load():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / LEVELS).astype(np.float32)[:, None]
    return x, d.target.astype(np.int64)


def _id_split():
    from sklearn.model_selection import train_test_split

    x, y = _load()
    idx = np.flatnonzero(np.isin(y, ID_CLASSES))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=y[idx], random_state=SPLIT_SEED)
    return (x[np.sort(train_idx)], y[np.sort(train_idx)]), (x[np.sort(test_idx)], y[np.sort(test_idx)])


def id_train():
    return _id_split()[0]


def id_test():
    return _id_split()[1]


def digits_6789():
    x, y = _load()
    keep = ~np.isin(y, ID_CLASSES)
    return x[keep], np.full(int(keep.sum()), -1, dtype=np.int64)


def letters(n: int = N_FAR, seed: int = 6789, alphabet: str = string.ascii_uppercase):
    """Capital letters (or ``alphabet``) drawn with Pillow's bundled font under random jitter."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    canvas = 32
    out = np.empty((n, 1, 8, 8), dtype=np.float32)
    fonts = {}
    for i in range(n):
        ch = alphabet[i % len(alphabet)]
        size = int(rng.integers(20, 29))
        if size not in fonts:
            fonts[size] = ImageFont.load_default(size=size)
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        stroke = int(rng.integers(1, 3))
        bbox = draw.textbbox((0, 0), ch, font=fonts[size], stroke_width=stroke)
        w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
        dx, dy = rng.integers(-2, 3, size=2)
        pos = ((canvas - w) / 2 - bbox[0] + dx, (canvas - h) / 2 - bbox[1] + dy)
        draw.text(pos, ch, fill=255, font=fonts[size], stroke_width=stroke, stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        small = np.asarray(img.resize((8, 8), resample=Image.BOX), dtype=np.float32) / 255.0
        peak = small.max() if small.max() > 0 else 1.0
        out[i, 0] = np.round(small / peak * LEVELS) / LEVELS
    return out, np.full(n, -1, dtype=np.int64)


def letters_lower(n: int = N_FAR, seed: int = 2024):
    """Training outliers for ``oodens train --diversity oe``: the lower-case letters a-z drawn like
    ``letters`` with another seed. Never an evaluation OOD set of the benchmark."""
    return letters(n, seed, string.ascii_lowercase)


def noise(n: int = N_FAR, seed: int = 4242):
    """Uniform random images on the digits' 17 grey levels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, LEVELS + 1, size=(n, 1, 8, 8)).astype(np.float32) / LEVELS
    return x, np.full(n, -1, dtype=np.int64)


#: the benchmark's OOD sets: name -> (images and labels, "near" or "far")
OOD_SETS = {"digits-6789": (digits_6789, "near"), "letters": (letters, "far"), "noise": (noise, "far")}


def letters_val(n: int = N_FAR, seed: int = 9001):
    """OOD validation set: capital letters drawn like ``letters`` with another seed (never evaluated)."""
    return letters(n, seed)


def noise_val(n: int = N_FAR, seed: int = 9002):
    """OOD validation set: uniform noise like ``noise`` with another seed (never evaluated)."""
    return noise(n, seed)


#: the benchmark's OOD validation sets (hyperparameter selection only): name -> images and labels
VAL_OOD_SETS = {"letters-val": letters_val, "noise-val": noise_val}
