"""Extraction: the only place a network runs. One pass over the data per mode and dataset split.

For each mode, every (split, view) that has no complete view in the cache is computed with the
network loaded once: all the views a split lacks in one loop over its batches, into memory-mapped
arrays (memory does not grow with the dataset beyond the views themselves). Per batch the clean
forward pass runs once and serves the base, layers and gram views (:mod:`oodens.views.kinds`);
odin and rankfeat add their own passes. Intact cached views are never touched; a damaged one (see
:meth:`oodens.views.cache.ViewCache.problem`) is reported in one warning line and recomputed. Views
are computed under their locks, so concurrent runs compute each once. The mode's final layer
(``head``: weight, bias) is cached too.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from oodens.data.presets import get_preset
from oodens.data.sources import DataSource, IndexSource
from oodens.errors import OodensError, OodensWarning
from oodens.modes.discovery import Mode
from oodens.runtime.device import resolve_device
from oodens.runtime.distributed import DistContext, barrier
from oodens.runtime.paths import safe_name
from oodens.runtime.progress import progress_bar
from oodens.version import __version__
from oodens.views.cache import Problem, ViewCache, ViewWriter
from oodens.views.kinds import VIEW_KINDS, clean_forward
from oodens.views.types import BASE, HEAD, Views, ViewSpec

Split = tuple[str, str]  # (dataset name, split)
HEAD_SOURCE = {"name": "head", "split": "model"}


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _writing(writer: ViewWriter):
    """The writer, committed when the block ends; aborted (nothing published) when it raises."""
    try:
        yield writer
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _report(mode: Mode, what: str, problem: Problem) -> None:
    """One warning line for a cached view that cannot be used, e.g. ``cached view digits/test logits.npy of
    mode seed-1000 is damaged (checksum mismatch): recomputing``."""
    warnings.warn(f"cached view {what} {problem.file} of mode {mode.name} ({mode.sha256[:12]}) is {problem.state} "
                  f"({problem.reason}): recomputing", OodensWarning, stacklevel=3)


def _what(src_name: str, split: str, spec: ViewSpec) -> str:
    return f"{src_name}/{split}" + ("" if spec == BASE else f" {spec.id}")


def model_identity(mode: Mode) -> dict:
    """What a checkpoint is read as; part of every view key (a view is only valid for the network it came from)."""
    return {"arch": mode.arch, "num_outputs": mode.num_outputs}


def _autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 for the forward passes; a no-op for fp32."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@dataclass
class Extraction:
    """Views of every (mode, split), and how many were computed vs read from the cache."""

    views: dict[str, dict[Split, Views]] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0

    def get(self, mode: str, source: DataSource) -> Views:
        return self.views[mode][(source.name, source.split)]


def _compute_into(model, source: DataSource, writers: dict[ViewSpec, ViewWriter], preset, batch_size: int, device,
                  on_batch, workers: int = 0, precision: str = "fp32", channels_last: bool = False):
    """Every view of ``writers`` in one loop over ``source``; per batch the clean forward pass runs once
    (when a shared kind is asked for) and every shared kind reads it."""
    kinds = {spec: VIEW_KINDS[spec.kind] for spec in writers}
    shared = any(k.shared for k in kinds.values())
    maps = any(k.maps for k in kinds.values())
    n = len(source)
    out: dict[tuple[ViewSpec, str], np.ndarray] = {}
    labels = writers[BASE].allocate("labels", (n,), np.int64) if BASE in writers else None
    start = 0
    for x, y in source.loader(preset, batch_size, workers):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stop = start + len(y)
        with _autocast(device, precision):
            fwd = clean_forward(model, x, maps) if shared else None
            for spec, kind in kinds.items():
                params = dict(spec.params)
                arrays = kind.fn(fwd, **params) if kind.shared else kind.fn(model, x, preset, **params)
                for name, t in arrays.items():
                    if (spec, name) not in out:
                        out[spec, name] = writers[spec].allocate(name, (n, *t.shape[1:]), np.float32)
                    out[spec, name][start:stop] = t.detach().float().cpu().numpy()
        if labels is not None:
            labels[start:stop] = y.numpy()
        start = stop
        on_batch()


def _meta(mode: Mode, dataset: dict, preset, spec: ViewSpec, precision: str = "fp32") -> dict:
    return {
        "precision": precision,
        "mode": mode.name,
        "checkpoint": str(mode.checkpoint),
        "checkpoint_sha256": mode.sha256,
        "arch": mode.arch,
        "num_outputs": mode.num_outputs,
        "dataset": dataset,
        "preset": preset.identity(),
        "view": spec.identity(),
        "oodens_version": __version__,
    }


def extract(
    modes: list[Mode],
    sources: list[DataSource],
    cache: ViewCache,
    batch_size: int = 256,
    device: str = "auto",
    specs: list[ViewSpec] | None = None,
    workers: int = 0,
    base_only: list[DataSource] = (),
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> Extraction:
    """Make sure every (mode, source, view spec) and every mode's head is cached; return them (memory-mapped).

    ``specs`` defaults to the base view only; the base view is always included. Sources in
    ``base_only`` (the ID-train split, which detectors only fit on) get the base view and the views
    detectors fit on (``layers``, ``gram``: :attr:`~oodens.views.kinds.ViewKind.fit`) only.
    ``precision`` (fp32, bf16, fp16) autocasts the forward passes, and is part of the cache key;
    ``channels_last`` and ``compile`` (torch.compile) only change speed.
    """
    if precision not in PRECISIONS:
        raise OodensError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    specs = list(dict.fromkeys([BASE, *(specs or [])]))
    ctx = DistContext.from_env() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else DistContext()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    result = Extraction()
    fit_specs = [s for s in specs if s == BASE or VIEW_KINDS[s.kind].fit]
    paths: dict[str, dict[tuple[Split, ViewSpec], Path]] = {}
    head_paths: dict[str, Path] = {}
    #: per mode, the passes to run: (source, the views it lacks: [(spec, path)])
    todo: dict[str, list[tuple[DataSource, list[tuple[ViewSpec, Path]]]]] = {}
    need_head: set[str] = set()
    for mode in modes:
        preset = get_preset(mode.preset)
        paths[mode.name] = {}
        for src in sources:
            missing = []
            for spec in fit_specs if any(src is b for b in base_only) else specs:
                path = cache.path(mode.sha256, src.identity(), preset.identity(), spec, precision,
                                  model=model_identity(mode))
                paths[mode.name][((src.name, src.split), spec)] = path
                if ViewCache.problem(path) is None:
                    result.cached += 1
                else:  # missing or unusable: decided again under the view's lock
                    missing.append((spec, path))
            if missing:
                todo.setdefault(mode.name, []).append((src, missing))
        head_paths[mode.name] = cache.path(mode.sha256, HEAD_SOURCE, {}, HEAD, model=model_identity(mode))
        if ViewCache.problem(head_paths[mode.name]) is not None:
            need_head.add(mode.name)
    total_batches = sum(-(-len(src) // batch_size) for jobs in todo.values() for src, _ in jobs)
    barrier(ctx)  # every rank has decided what is missing before anything is written
    with progress_bar(disable=not ctx.is_main) as bar:
        task = bar.add_task("extracting", total=total_batches, info="", unit="batches", rate_unit="images",
                            scale=batch_size, log_every=0.1)
        for mode in modes:
            jobs = todo.get(mode.name, [])
            if not jobs and mode.name not in need_head:
                continue
            preset = get_preset(mode.preset)
            model = mode.load().to(dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            if compile:
                model = _compiled(model)
            if mode.name in need_head and ctx.is_main:
                head = head_paths[mode.name]
                with cache.lock(head):
                    problem = ViewCache.problem(head)
                    if problem is not None:
                        if not problem.missing:
                            _report(mode, "head", problem)
                            cache.discard(head)
                        _write_head(model, head, _meta(mode, HEAD_SOURCE, preset, HEAD), cache)
            for src, views in jobs:
                cache.clean_stale(views[0][1].parent)
                bar.update(task, info=f"{mode.name} / {src.name}-{src.split} / {', '.join(s.id for s, _ in views)}")
                metas = {spec: _meta(mode, src.identity(), preset, spec, precision) for spec, _ in views}
                compute = partial(_compute_into, model, preset=preset, batch_size=batch_size,
                                  device=dev, workers=workers, precision=precision, channels_last=channels_last)
                if ctx.enabled:  # torchrun: the ranks of one job share the pass; rank 0 publishes
                    for spec, path in views:
                        problem = ViewCache.problem(path)
                        if ctx.is_main and problem is not None and not problem.missing:
                            _report(mode, _what(src.name, src.split, spec), problem)  # replaced on commit
                    _sharded(compute, src, views, metas, cache, batch_size, ctx, lambda: bar.advance(task))
                    result.computed += len(views)
                    continue
                with contextlib.ExitStack() as stack:
                    for _, path in sorted(views, key=lambda v: str(v[1])):  # one lock order: no deadlock
                        stack.enter_context(cache.lock(path))
                    writers = {}
                    for spec, path in views:
                        problem = ViewCache.problem(path)
                        if problem is None:  # another process computed it while this one waited for the lock
                            result.cached += 1
                            continue
                        if not problem.missing:
                            _report(mode, _what(src.name, src.split, spec), problem)
                            cache.discard(path)
                        writers[spec] = stack.enter_context(_writing(cache.writer(path, metas[spec])))
                    if not writers:
                        bar.advance(task, -(-len(src) // batch_size))
                        continue
                    compute(source=src, writers=writers, on_batch=lambda: bar.advance(task))
                    result.computed += len(writers)
            del model
    barrier(ctx)
    for mode in modes:
        head = ViewCache.read(head_paths[mode.name])
        result.views[mode.name] = {}
        for src in sources:
            split = (src.name, src.split)
            base = ViewCache.read(paths[mode.name][(split, BASE)])
            extra = {s.id: _extra_view(ViewCache.read(paths[mode.name][(split, s)]))
                     for s in specs if s != BASE and (split, s) in paths[mode.name]}
            result.views[mode.name][split] = Views(
                logits=base["logits"], features=base["features"], labels=base["labels"],
                weight=head["weight"], bias=head["bias"], extra=extra,
                classes=np.asarray(mode.kept_classes) if mode.kept_classes else None,
            )
    return result


def _extra_view(arrays: dict[str, np.ndarray]):
    """How a cached view other than the base view appears in :attr:`Views.extra`: its logits array (odin,
    rankfeat), or all its arrays (layers, gram)."""
    return arrays["logits"] if set(arrays) == {"logits"} else arrays


def _sharded(compute, src: DataSource, views: list[tuple[ViewSpec, Path]], metas: dict[ViewSpec, dict],
             cache: ViewCache, batch_size: int, ctx, on_batch):
    """Under torchrun: each rank computes a contiguous run of whole batches (so every batch is the
    one a single process would run) into a shard folder per view; rank 0 joins the shards into the views."""
    n = len(src)
    n_batches = -(-n // batch_size)
    lo, hi = (n_batches * ctx.rank // ctx.world_size, n_batches * (ctx.rank + 1) // ctx.world_size)
    shards = {spec: path.parent / f".shards-{path.name}" for spec, path in views}
    mine = {spec: folder / f"rank-{ctx.rank:05d}" for spec, folder in shards.items()}
    with contextlib.ExitStack() as stack:
        writers = {spec: stack.enter_context(_writing(ViewWriter(folder, {"rank": ctx.rank})))
                   for spec, folder in mine.items() if not ViewCache.is_complete(folder)}
        if writers:
            compute(source=IndexSource(src, np.arange(lo * batch_size, min(hi * batch_size, n))), writers=writers,
                    on_batch=on_batch)
    barrier(ctx)
    if ctx.is_main:
        for spec, path in views:
            parts = [ViewCache.read(shards[spec] / f"rank-{r:05d}") for r in range(ctx.world_size)]
            # a rank without a batch (more ranks than batches) wrote empty or no arrays
            parts = [p for p in parts if p and min(len(a) for a in p.values()) > 0]
            with _writing(cache.writer(path, metas[spec])) as writer:
                for name in parts[0]:
                    full = writer.allocate(name, (n, *parts[0][name].shape[1:]), parts[0][name].dtype)
                    start = 0
                    for p in parts:
                        full[start : start + len(p[name])] = p[name]
                        start += len(p[name])
            shutil.rmtree(shards[spec], ignore_errors=True)
    barrier(ctx)


class _compiled(torch.nn.Module):
    """torch.compile of the extraction entry points, keeping the architecture's interface."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.forward_features = torch.compile(model.forward_features)
        self.forward = torch.compile(model.forward)

    @property
    def eager(self) -> torch.nn.Module:
        """The uncompiled network (forward hooks on its modules capture the multi-layer views' maps)."""
        return self.model

    @property
    def classifier(self):
        return self.model.classifier

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def _write_head(model, path: Path, meta: dict, cache: ViewCache) -> None:
    w = model.classifier.weight.detach().float().cpu().numpy()
    b = model.classifier.bias.detach().float().cpu().numpy()
    with _writing(cache.writer(path, meta)) as writer:
        writer.allocate("weight", w.shape, np.float32)[:] = w
        writer.allocate("bias", b.shape, np.float32)[:] = b


def export_views(extraction: Extraction, out: Path) -> None:
    """Write each mode's views as plain NumPy: ``out/<mode>/<dataset>/<split>/{logits,features,labels}.npy``."""
    for mode, by_split in extraction.views.items():
        for (name, split), views in by_split.items():
            folder = Path(out) / mode / safe_name(name) / split
            folder.mkdir(parents=True, exist_ok=True)
            for arr in ("logits", "features", "labels"):
                np.save(folder / f"{arr}.npy", np.asarray(getattr(views, arr)), allow_pickle=False)
