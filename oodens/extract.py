"""Extraction: the only place a network runs. One forward pass per mode and dataset.

For each mode and each dataset split that has no complete view in the cache, the
network is loaded once and every missing split is streamed through it, batch by
batch, into memory-mapped arrays (memory does not grow with the dataset beyond the
views themselves). Cached views are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oodens import __version__
from oodens.data import DataSource, get_preset
from oodens.modes import Mode
from oodens.progress import progress_bar
from oodens.views import ARRAYS, ViewCache, Views

Split = tuple[str, str]  # (dataset name, split)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Extraction:
    """Views of every (mode, split), and how many were computed vs read from the cache."""

    views: dict[str, dict[Split, Views]] = field(default_factory=dict)
    paths: dict[str, dict[Split, Path]] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0

    def get(self, mode: str, source: DataSource) -> Views:
        return self.views[mode][(source.name, source.split)]


def _forward_into(model: torch.nn.Module, source: DataSource, writer, preset, batch_size: int, device, on_batch):
    n = len(source)
    logits = features = None
    labels = writer.allocate("labels", (n,), np.int64)
    start = 0
    with torch.inference_mode():
        for x, y in source.loader(preset, batch_size):
            x = x.to(device, non_blocking=True)
            h = model.forward_features(x)
            z = model.classifier(h)
            if logits is None:
                logits = writer.allocate("logits", (n, z.shape[1]), np.float32)
                features = writer.allocate("features", (n, h.shape[1]), np.float32)
            stop = start + len(y)
            logits[start:stop] = z.float().cpu().numpy()
            features[start:stop] = h.float().cpu().numpy()
            labels[start:stop] = y.numpy()
            start = stop
            on_batch()


def extract(
    modes: list[Mode],
    sources: list[DataSource],
    cache: ViewCache,
    batch_size: int = 256,
    device: str = "auto",
) -> Extraction:
    """Make sure every (mode, source) view is in the cache; return them all (memory-mapped)."""
    dev = resolve_device(device)
    result = Extraction()
    todo: dict[str, list[tuple[DataSource, Path]]] = {}
    for mode in modes:
        preset = get_preset(mode.preset)
        result.views[mode.name] = {}
        result.paths[mode.name] = {}
        for src in sources:
            path = cache.path(mode.sha256, src.identity(), preset.identity())
            result.paths[mode.name][(src.name, src.split)] = path
            if ViewCache.is_complete(path):
                result.cached += 1
            else:
                todo.setdefault(mode.name, []).append((src, path))
    total_batches = sum(-(-len(src) // batch_size) for jobs in todo.values() for src, _ in jobs)
    with progress_bar() as bar:
        task = bar.add_task("extracting", total=total_batches, info="")
        for mode in modes:
            jobs = todo.get(mode.name)
            if not jobs:
                continue
            preset = get_preset(mode.preset)
            model = mode.load().to(dev)
            for src, path in jobs:
                cache.clean_stale(path.parent)
                if ViewCache.is_complete(path):  # another process finished it meanwhile
                    result.cached += 1
                    continue
                bar.update(task, info=f"{mode.name} / {src.name}-{src.split}")
                meta = {
                    "mode": mode.name,
                    "checkpoint": str(mode.checkpoint),
                    "checkpoint_sha256": mode.sha256,
                    "arch": mode.arch,
                    "dataset": src.identity(),
                    "preset": preset.identity(),
                    "view": "base",
                    "arrays": list(ARRAYS),
                    "oodens_version": __version__,
                }
                writer = cache.writer(path, meta)
                try:
                    _forward_into(model, src, writer, preset, batch_size, dev, lambda: bar.advance(task))
                    writer.commit()
                except BaseException:
                    writer.abort()
                    raise
                result.computed += 1
            del model
    for mode in modes:
        for split, path in result.paths[mode.name].items():
            result.views[mode.name][split] = ViewCache.read(path)
    return result


def export_views(extraction: Extraction, out: Path) -> None:
    """Write each mode's views as plain NumPy: ``out/<mode>/<dataset>/<split>/{logits,features,labels}.npy``."""
    for mode, by_split in extraction.views.items():
        for (name, split), views in by_split.items():
            folder = Path(out) / mode / name / split
            folder.mkdir(parents=True, exist_ok=True)
            for arr in ARRAYS:
                a = getattr(views, arr)
                if a is not None:
                    np.save(folder / f"{arr}.npy", np.asarray(a), allow_pickle=False)
