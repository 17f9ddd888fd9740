"""Extraction: the only place a network runs. One read of the data per dataset split for all modes.

The modes are taken ``modes_at_once`` at a time (default: all), their networks loaded together. Each
split that some mode of the group lacks a complete view of is read once: every batch is decoded once
(:func:`batches`), preprocessed once per distinct preset (modes sharing a preset share the tensor), and
every mode runs its forward passes on it, writing all the views it lacks into memory-mapped arrays
(memory does not grow with the dataset beyond the views themselves). Per mode and batch the clean
forward pass runs once and serves the base, layers and gram views (:mod:`oodens.views.kinds`); odin
and rankfeat add their own passes. The views are byte-identical to extracting one mode at a time.
Intact cached views are never touched; a damaged one (see :meth:`oodens.views.cache.ViewCache.problem`)
is reported in one warning line and recomputed. Views are computed under their locks (taken in one
global order), so concurrent runs compute each once. The mode's final layer (``head``: weight, bias) is
cached too.
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodens.data.presets import get_preset
from oodens.data.sources import (ArraySource, DataSource, FileListSource, IndexSource, load_item, to_image,
                                 to_tensor)
from oodens.errors import OodensError, OodensWarning
from oodens.modes.discovery import Mode
from oodens.runtime.device import resolve_device
from oodens.runtime.distributed import DistContext, barrier
from oodens.runtime.paths import safe_name
from oodens.runtime.progress import progress_bar
from oodens.version import __version__
from oodens.views.cache import Problem, ViewCache, ViewWriter
from oodens.views.decode import decodes_on_gpu, gpu_batches, preset_identity, resolve_decode
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


@dataclass
class Member:
    """One mode's part of a shared pass: its network and its preset (modes sharing a preset share the tensor)."""

    key: str
    model: torch.nn.Module
    preset: object


class _MultiItems(Dataset):
    """Sample i decoded once (``source.item``) and preprocessed for each distinct preset: (tensors, label)."""

    def __init__(self, source: DataSource, presets: list):
        self.source, self.presets = source, presets
        self.channels = [len(p.mean) for p in presets]

    def __len__(self):
        return len(self.source)

    def _load(self, i):
        img, label = self.source.item(i)
        out = []
        for preset, channels in zip(self.presets, self.channels):
            # exactly the single-preset path (:class:`oodens.data.sources._Items`), per preset
            x = img if isinstance(img, torch.Tensor) else to_tensor(to_image(img, channels, preset))
            out.append(preset.normalize(x[None])[0])
        return tuple(out), label

    def __getitem__(self, i):
        return load_item(self._load, i, self.source)


def _array_batches(source: ArraySource, presets: list, batch_size: int):
    """A float array source at its size: slices of the array, normalised per preset (as its own loader does
    for the whole array: elementwise, so the same values)."""
    x, y = source.arrays
    for s in range(0, len(y), batch_size):
        xs = torch.from_numpy(x[s : s + batch_size])
        # standard strides, as the DataLoader's collation gives: a size-1 channel dimension with numpy's
        # strides would read as channels_last, and the convolutions would take another path
        yield (tuple(p.normalize(xs).clone(memory_format=torch.contiguous_format) for p in presets),
               torch.from_numpy(y[s : s + batch_size]))


#: image lists this long decode their JPEGs with torchvision's decoder (:func:`oodens.data.sources.decode_jpeg_file`,
#: the same pixels as Pillow, ~25 % less time per image): its import (1-5 s) pays off from about here
FAST_DECODE_MIN = 20_000


def _load_fast_decoder() -> None:
    with contextlib.suppress(Exception):
        import torchvision.io  # noqa: F401  (decode_jpeg_file uses it once loaded; workers inherit it)


def batches(source: DataSource, presets: list, batch_size: int, workers: int = 0, pin: bool = False,
            device: torch.device | None = None, decode: str = "cpu"):
    """Batches of (one preprocessed tensor per preset, labels) in dataset order, each image read and decoded
    once whatever the number of presets. A source with a loader of its own (other than the base classes')
    is read once per preset through it. ``decode="gpu"`` (resolved, :func:`oodens.views.decode.resolve_decode`):
    an image list is decoded on ``device`` (:func:`oodens.views.decode.gpu_batches`), its tensors already there."""
    if decodes_on_gpu(source, decode):
        yield from gpu_batches(source, presets, batch_size, workers, device)
        return
    loader = type(source).loader
    if loader is FileListSource.loader and loader is not DataSource.loader:
        # an image list read at the images' own size (geometry=False): the presets without resize and crop,
        # as its own loader applies them
        if not getattr(source, "geometry", True):
            presets = [replace(p, resize=None, crop=None) for p in presets]
        loader = DataSource.loader
    if loader is ArraySource.loader:
        x = source.arrays[0]
        if x.dtype != np.uint8 and all(p.resize is None or p.resize == x.shape[-1] == x.shape[-2] for p in presets):
            yield from _array_batches(source, presets, batch_size)
            return
        loader = DataSource.loader
    if loader is DataSource.loader:
        if isinstance(source, FileListSource) and len(source) >= FAST_DECODE_MIN:
            _load_fast_decoder()
        yield from DataLoader(_MultiItems(source, presets), batch_size=batch_size, shuffle=False,
                              num_workers=workers, pin_memory=pin, persistent_workers=False)
        return
    for parts in zip(*(source.loader(p, batch_size, workers) for p in presets)):
        yield tuple(x for x, _ in parts), parts[0][1]


def _compute_into(members: list[Member], *, source: DataSource, writers: dict[str, dict[ViewSpec, ViewWriter]],
                  batch_size: int, device, on_batch, workers: int = 0, precision: str = "fp32",
                  channels_last: bool = False, decode: str = "cpu"):
    """Every view of ``writers`` (per member key) in one loop over ``source``: each batch is read and
    decoded once, preprocessed once per distinct preset, and every member's forward runs on it; per member
    the clean forward pass runs once (when a shared kind is asked for) and every shared kind reads it."""
    members = [m for m in members if writers.get(m.key)]
    presets = list(dict.fromkeys(m.preset for m in members))
    slot = {m.key: presets.index(m.preset) for m in members}
    kinds = {m.key: {spec: VIEW_KINDS[spec.kind] for spec in writers[m.key]} for m in members}
    # no input gradients asked for (odin): no autograd bookkeeping at all
    grad_free = all(k.shared or spec.kind == "rankfeat" for ks in kinds.values() for spec, k in ks.items())
    n = len(source)
    out: dict[tuple[str, ViewSpec, str], np.ndarray] = {}
    labels = [w[BASE].allocate("labels", (n,), np.int64) for w in writers.values() if BASE in w]
    start = 0
    pin = device.type == "cuda"
    for xs, y in batches(source, presets, batch_size, workers, pin, device, decode):
        xs = [x.to(device, non_blocking=True) for x in xs]
        if channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        stop = start + len(y)
        with _autocast(device, precision), (torch.inference_mode() if grad_free else contextlib.nullcontext()):
            for m in members:
                x = xs[slot[m.key]]
                mk = kinds[m.key]
                fwd = clean_forward(m.model, x, any(k.maps for k in mk.values())) \
                    if any(k.shared for k in mk.values()) else None
                for spec, kind in mk.items():
                    arrays = kind.fn(fwd, **dict(spec.params)) if kind.shared else \
                        kind.fn(m.model, x, m.preset, **dict(spec.params))
                    for name, t in arrays.items():
                        dst = out.get((m.key, spec, name))
                        if dst is None:
                            dst = out[m.key, spec, name] = writers[m.key][spec].allocate(
                                name, (n, *t.shape[1:]), np.float32)
                        t = t.detach()
                        if t.dtype != torch.float32:
                            t = t.float()
                        dst[start:stop] = t.cpu().numpy()
        if labels:
            yn = y.numpy()
            for lab in labels:
                lab[start:stop] = yn
        start = stop
        on_batch()


def _meta(mode: Mode, dataset: dict, preset: dict, spec: ViewSpec, precision: str = "fp32") -> dict:
    return {
        "precision": precision,
        "mode": mode.name,
        "checkpoint": str(mode.checkpoint),
        "checkpoint_sha256": mode.sha256,
        "arch": mode.arch,
        "num_outputs": mode.num_outputs,
        "dataset": dataset,
        "preset": preset,
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
    modes_at_once: int | None = None,
    decode: str = "cpu",
) -> Extraction:
    """Make sure every (mode, source, view spec) and every mode's head is cached; return them (memory-mapped).

    ``specs`` defaults to the base view only; the base view is always included. Sources in
    ``base_only`` (the ID-train split, which detectors only fit on) get the base view and the views
    detectors fit on (``layers``, ``gram``: :attr:`~oodens.views.kinds.ViewKind.fit`) only.
    ``precision`` (fp32, bf16, fp16) autocasts the forward passes, and is part of the cache key;
    ``channels_last`` and ``compile`` (torch.compile) only change speed.
    ``decode`` (auto, cpu, gpu; :mod:`oodens.views.decode`): where image lists' JPEGs are decoded; GPU-decoded
    views are other views (the decoder is part of their key).

    Decode once: the modes are taken ``modes_at_once`` at a time (default: all of them), their networks
    loaded together, and each split is read once per group: every batch is decoded once, preprocessed
    once per distinct preset, and every mode of the group runs its forward passes on it. The views are
    the same bytes as one mode at a time (``modes_at_once=1``).
    """
    if precision not in PRECISIONS:
        raise OodensError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if modes_at_once is not None and (isinstance(modes_at_once, bool) or not isinstance(modes_at_once, int)
                                      or modes_at_once < 1):
        raise OodensError(f"--modes-at-once {modes_at_once!r}: expected a positive integer")
    specs = list(dict.fromkeys([BASE, *(specs or [])]))
    ctx = DistContext.from_env() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else DistContext()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    decode = resolve_decode(decode, dev)
    result = Extraction()
    fit_specs = [s for s in specs if s == BASE or VIEW_KINDS[s.kind].fit]
    paths: dict[str, dict[tuple[Split, ViewSpec], Path]] = {}
    head_paths: dict[str, Path] = {}
    #: per mode and source index, the views it lacks: [(spec, path)]
    todo: dict[str, dict[int, list[tuple[ViewSpec, Path]]]] = {}
    need_head: set[str] = set()
    for mode in modes:
        preset = get_preset(mode.preset)
        paths[mode.name] = {}
        for j, src in enumerate(sources):
            missing = []
            for spec in fit_specs if any(src is b for b in base_only) else specs:
                path = cache.path(mode.sha256, src.identity(), preset_identity(preset, src, decode), spec, precision,
                                  model=model_identity(mode))
                paths[mode.name][((src.name, src.split), spec)] = path
                if ViewCache.problem(path) is None:
                    result.cached += 1
                else:  # missing or unusable: decided again under the view's lock
                    missing.append((spec, path))
            if missing:
                todo.setdefault(mode.name, {})[j] = missing
        head_paths[mode.name] = cache.path(mode.sha256, HEAD_SOURCE, {}, HEAD, model=model_identity(mode))
        if ViewCache.problem(head_paths[mode.name]) is not None:
            need_head.add(mode.name)
    busy = [m for m in modes if m.name in todo or m.name in need_head]
    k = len(busy) if modes_at_once is None else modes_at_once
    groups = [busy[i : i + k] for i in range(0, len(busy), max(k, 1))]
    total_batches = sum(-(-len(src) // batch_size) for group in groups for j, src in enumerate(sources)
                        if any(j in todo.get(m.name, {}) for m in group))
    barrier(ctx)  # every rank has decided what is missing before anything is written
    with progress_bar(disable=not ctx.is_main) as bar:
        task = bar.add_task("extracting", total=total_batches, info="", unit="batches", rate_unit="images",
                            scale=batch_size, log_every=0.1)
        for group in groups:
            members = {}
            for mode in group:
                preset = get_preset(mode.preset)
                model = mode.load().to(dev)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                if compile:
                    model = _compiled(model)
                members[mode.name] = Member(mode.name, model, preset)
                if mode.name in need_head and ctx.is_main:
                    head = head_paths[mode.name]
                    with cache.lock(head):
                        problem = ViewCache.problem(head)
                        if problem is not None:
                            if not problem.missing:
                                _report(mode, "head", problem)
                                cache.discard(head)
                            _write_head(model, head, _meta(mode, HEAD_SOURCE, preset.identity(), HEAD), cache)
            for j, src in enumerate(sources):
                jobs = [(mode, todo[mode.name][j]) for mode in group if j in todo.get(mode.name, {})]
                if not jobs:
                    continue
                n_batches = -(-len(src) // batch_size)
                for folder in dict.fromkeys(path.parent for _, views in jobs for _, path in views):
                    cache.clean_stale(folder)
                ids = ", ".join(dict.fromkeys(s.id for _, views in jobs for s, _ in views))
                who = jobs[0][0].name if len(jobs) == 1 else f"{len(jobs)} modes"
                bar.update(task, info=f"{who} / {src.name}-{src.split} / {ids}")
                views = [(mode, spec, path) for mode, vs in jobs for spec, path in vs]
                metas = {(mode.name, spec): _meta(mode, src.identity(),
                                                  preset_identity(members[mode.name].preset, src, decode), spec,
                                                  precision)
                         for mode, spec, _ in views}
                compute = partial(_compute_into, [members[mode.name] for mode, _ in jobs], batch_size=batch_size,
                                  device=dev, workers=workers, precision=precision, channels_last=channels_last,
                                  decode=decode)
                if ctx.enabled:  # torchrun: the ranks of one job share the pass; rank 0 publishes
                    for mode, spec, path in views:
                        problem = ViewCache.problem(path)
                        if ctx.is_main and problem is not None and not problem.missing:
                            _report(mode, _what(src.name, src.split, spec), problem)  # replaced on commit
                    _sharded(compute, src, [(m.name, s, p) for m, s, p in views], metas, cache, batch_size, ctx,
                             lambda: bar.advance(task))
                    result.computed += len(views)
                    continue
                with contextlib.ExitStack() as stack:
                    for _, _, path in sorted(views, key=lambda v: str(v[2])):  # one lock order: no deadlock
                        stack.enter_context(cache.lock(path))
                    writers: dict[str, dict[ViewSpec, ViewWriter]] = {}
                    for mode, spec, path in views:
                        problem = ViewCache.problem(path)
                        if problem is None:  # another process computed it while this one waited for the lock
                            result.cached += 1
                            continue
                        if not problem.missing:
                            _report(mode, _what(src.name, src.split, spec), problem)
                            cache.discard(path)
                        writers.setdefault(mode.name, {})[spec] = stack.enter_context(
                            _writing(cache.writer(path, metas[mode.name, spec])))
                    if not writers:
                        bar.advance(task, n_batches)
                        continue
                    compute(source=src, writers=writers, on_batch=lambda: bar.advance(task))
                    # all views of the pass published together (each atomically), their disk waits overlapped
                    ViewWriter.commit_all([w for ws in writers.values() for w in ws.values()])
                    result.computed += sum(len(w) for w in writers.values())
            del members
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


def _sharded(compute, src: DataSource, views: list[tuple[str, ViewSpec, Path]], metas: dict[tuple[str, ViewSpec], dict],
             cache: ViewCache, batch_size: int, ctx, on_batch):
    """Under torchrun: each rank computes a contiguous run of whole batches (so every batch is the
    one a single process would run) into a shard folder per view; rank 0 joins the shards into the views.
    ``views``: (mode name, spec, path) of every view of the shared pass."""
    n = len(src)
    n_batches = -(-n // batch_size)
    lo, hi = (n_batches * ctx.rank // ctx.world_size, n_batches * (ctx.rank + 1) // ctx.world_size)
    shards = {(key, spec): path.parent / f".shards-{path.name}" for key, spec, path in views}
    mine = {v: folder / f"rank-{ctx.rank:05d}" for v, folder in shards.items()}
    with contextlib.ExitStack() as stack:
        writers: dict[str, dict[ViewSpec, ViewWriter]] = {}
        for (key, spec), folder in mine.items():
            if not ViewCache.is_complete(folder):
                writers.setdefault(key, {})[spec] = stack.enter_context(
                    _writing(ViewWriter(folder, {"rank": ctx.rank})))
        if writers:
            compute(source=IndexSource(src, np.arange(lo * batch_size, min(hi * batch_size, n))), writers=writers,
                    on_batch=on_batch)
    barrier(ctx)
    if ctx.is_main:
        for key, spec, path in views:
            parts = [ViewCache.read(shards[key, spec] / f"rank-{r:05d}") for r in range(ctx.world_size)]
            # a rank without a batch (more ranks than batches) wrote empty or no arrays
            parts = [p for p in parts if p and min(len(a) for a in p.values()) > 0]
            with _writing(cache.writer(path, metas[key, spec])) as writer:
                for name in parts[0]:
                    full = writer.allocate(name, (n, *parts[0][name].shape[1:]), parts[0][name].dtype)
                    start = 0
                    for p in parts:
                        full[start : start + len(p[name])] = p[name]
                        start += len(p[name])
            shutil.rmtree(shards[key, spec], ignore_errors=True)
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
