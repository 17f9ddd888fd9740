"""Benchmarks as data: an ID train split, an ID test split and named OOD sets.

A :class:`DataSource` is one dataset split. It knows its identity (name, split and
a fingerprint of its content), which is part of every view's cache key, and it
yields preprocessed batches for extraction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodens.data.presets import Preset
from oodens.errors import OodensError


@dataclass(eq=False)
class DataSource:
    """One split of one dataset held as arrays: images in [0, 1] (N, C, H, W) and labels.

    ``build`` makes the arrays lazily, so naming a benchmark costs nothing until
    a view is actually missing from the cache.
    """

    name: str
    split: str
    build: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.build()
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.arrays[1])

    @cached_property
    def fingerprint(self) -> str:
        x, y = self.arrays
        h = hashlib.sha256()
        h.update(str(x.shape).encode())
        h.update(x.tobytes())
        h.update(y.tobytes())
        return h.hexdigest()

    def identity(self) -> dict:
        return {"name": self.name, "split": self.split, "fingerprint": self.fingerprint}

    def loader(self, preset: Preset, batch_size: int) -> DataLoader:
        """Batches of (preprocessed images, labels) in dataset order."""
        x, y = self.arrays
        xs = preset.normalize(torch.from_numpy(x))
        return DataLoader(TensorDataset(xs, torch.from_numpy(y)), batch_size=batch_size, shuffle=False)


@dataclass
class Benchmark:
    name: str
    id_train: DataSource
    id_test: DataSource
    ood: dict[str, DataSource]
    num_classes: int

    def select_ood(self, names: list[str] | None) -> dict[str, DataSource]:
        """The OOD sets to evaluate: all by default, else the named ones, in the given order."""
        if not names:
            return dict(self.ood)
        unknown = [n for n in names if n not in self.ood]
        if unknown:
            raise OodensError(
                f"unknown OOD set {', '.join(map(repr, unknown))} for benchmark {self.name!r}: "
                f"expected one of {', '.join(self.ood)}"
            )
        return {n: self.ood[n] for n in names}


def _digits() -> Benchmark:
    from oodens.data import digits

    return digits.benchmark()


#: benchmark name -> factory. New benchmarks register here.
BENCHMARKS: dict[str, Callable[[], Benchmark]] = {"digits": _digits}


def get_benchmark(name: str) -> Benchmark:
    try:
        factory = BENCHMARKS[name.lower()]
    except KeyError:
        raise OodensError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}") from None
    return factory()
