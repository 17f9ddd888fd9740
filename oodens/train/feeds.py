"""Training data: seeded augmentation and batch feeds, one process or one shard per torchrun process.

A feed yields the batches of one epoch from a generator ``g``: a fresh permutation per pass, and the
augmentation drawn from the same generator, so a seed fixes data order and augmentation, and every
process of a torchrun job (same seed) agrees on the global batches. Each process takes every
world_size-th sample of each global batch.

- :class:`TensorFeed`: splits held in memory as float arrays (digits); batch augmentations (the shift
  offsets of a whole batch drawn from ``g``, exactly as the shipped digits modes were trained).
- :class:`LoaderFeed`: any source (CIFAR arrays, image folders) through a DataLoader; per-sample
  augmentations get a seed each drawn from ``g``, so the result does not depend on ``--workers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oodens.data.presets import Preset
from oodens.data.sources import ArraySource, DataSource, load_item, resize_crop, to_tensor
from oodens.errors import OodensError
from oodens.runtime.distributed import DistContext


def _random_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image of a batch by up to ``shift`` pixels (zero fill)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=g)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _as_tensor(img, preset: Preset) -> torch.Tensor:
    """A source item as float CHW in [0, 1] in the preset's geometry and channel count."""
    if isinstance(img, torch.Tensor):
        return img
    if not isinstance(img, Image.Image):
        a = np.asarray(img)
        img = Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    return to_tensor(resize_crop(img.convert("RGB" if len(preset.mean) == 3 else "L"), preset))


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.flip(-1) if torch.rand((), generator=gen) < 0.5 else x


def crop_flip(img, preset: Preset, gen: torch.Generator, size: int = 32, pad: int = 4) -> torch.Tensor:
    """Random crop of ``size`` from the image zero-padded by ``pad``, then a horizontal flip (p = 0.5)."""
    x = F.pad(_as_tensor(img, preset), (pad, pad, pad, pad))
    top, left = (int(v) for v in torch.randint(0, x.shape[1] - size + 1, (2,), generator=gen))
    return _flip(x[:, top : top + size, left : left + size], gen)


def resized_crop_params(w: int, h: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, width, height), drawn from ``gen``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale, generator=gen))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio, generator=gen)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return left, top, cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def resized_crop_flip(img, preset: Preset, gen: torch.Generator, size: int = 224) -> torch.Tensor:
    """RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3, bilinear) and a horizontal flip (p = 0.5)."""
    if isinstance(img, torch.Tensor):
        img = Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy())
    elif not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    img = img.convert("RGB" if len(preset.mean) == 3 else "L")
    left, top, cw, ch = resized_crop_params(*img.size, gen)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return _flip(to_tensor(img), gen)


@dataclass(frozen=True)
class Augment:
    """A training augmentation: on whole in-memory batches (``batch``) or per sample (``sample``)."""

    batch: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    sample: Callable[[object, Preset, torch.Generator], torch.Tensor] | None = None


AUGMENTS = {
    "shift1": Augment(batch=lambda x, g: _random_shift(x, 1, g)),
    "crop32-flip": Augment(sample=crop_flip),
    "rrc224-flip": Augment(sample=resized_crop_flip),
}


def _global_batches(n: int, batch_size: int, g: torch.Generator, world: int, count: int | None,
                    per_batch: Callable[[torch.Tensor], object] = lambda idx: None) -> Iterator:
    """(indices, extra) of the global batches: a fresh permutation from ``g`` per pass over the data,
    ``per_batch(indices)`` drawn right after each batch is cut. One pass, or ``count`` batches
    (as many passes as needed). Batches smaller than the number of processes are skipped."""
    produced = 0
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < world:
                continue
            yield idx, per_batch(idx)
            produced += 1
            if count is not None and produced == count:
                return
        if count is None or produced == 0:
            return


class TensorFeed:
    """A split held in memory as float tensors (digits): batches cut, augmented and normalised on the fly."""

    def __init__(self, source: ArraySource, preset: Preset, augment: Augment, batch_size: int, ctx: DistContext):
        x, y = source.arrays
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.preset, self.augment, self.batch_size, self.ctx = preset, augment, batch_size, ctx

    def steps(self) -> int:
        n, b, w = len(self.y), self.batch_size, self.ctx.world_size
        return sum(1 for s in range(0, n, b) if min(b, n - s) >= w)

    def epoch(self, g: torch.Generator, count: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx, _ in _global_batches(len(self.y), self.batch_size, g, self.ctx.world_size, count):
            x = self.x[idx]
            if self.augment.batch is not None:
                x = self.augment.batch(x, g)
            x, y = self.preset.normalize(x), self.y[idx]
            if self.ctx.enabled:
                x, y = x[self.ctx.rank :: self.ctx.world_size], y[self.ctx.rank :: self.ctx.world_size]
            yield x, y


class _Augmented(Dataset):
    """(index, augmentation seed) -> (augmented, normalised image, label)."""

    def __init__(self, source: DataSource, preset: Preset, augment: Augment):
        self.source, self.preset, self.augment = source, preset, augment

    def __len__(self):
        return len(self.source)

    def _load(self, key):
        i, seed = key
        img, label = self.source.item(i)
        gen = torch.Generator().manual_seed(seed)
        x = self.augment.sample(img, self.preset, gen) if self.augment.sample else _as_tensor(img, self.preset)
        return self.preset.normalize(x[None])[0], label

    def __getitem__(self, key):
        # a sample that cannot be loaded: one line naming it, also from DataLoader workers
        i, seed = key
        return load_item(lambda j: self._load((j, seed)), i, self.source)


class LoaderFeed:
    """Any source (CIFAR arrays, image folders): a DataLoader over a precomputed plan of
    (index, augmentation seed), so the augmentation does not depend on the number of workers."""

    def __init__(self, source: DataSource, preset: Preset, augment: Augment, batch_size: int, ctx: DistContext,
                 workers: int = 0):
        self.n = len(source)
        self.dataset = _Augmented(source, preset, augment)
        self.batch_size, self.ctx, self.workers = batch_size, ctx, workers

    def steps(self) -> int:
        n, b, w = self.n, self.batch_size, self.ctx.world_size
        return sum(1 for s in range(0, n, b) if min(b, n - s) >= w)

    def epoch(self, g: torch.Generator, count: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        r, w = self.ctx.rank, self.ctx.world_size
        plan = [list(zip(idx[r::w].tolist(), seeds[r::w].tolist()))
                for idx, seeds in _global_batches(self.n, self.batch_size, g, w, count,
                                                  lambda idx: torch.randint(0, 2**62, (len(idx),), generator=g))]
        loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available())
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.long)


def make_feed(source: DataSource, preset: Preset, augment: Augment, batch_size: int, ctx: DistContext,
              workers: int = 0):
    if augment.batch is not None:
        if not (isinstance(source, ArraySource) and source.arrays[0].dtype != np.uint8):
            raise OodensError(f"{source.name}: a batch augmentation needs an in-memory float dataset")
        return TensorFeed(source, preset, augment, batch_size, ctx)
    return LoaderFeed(source, preset, augment, batch_size, ctx, workers)
