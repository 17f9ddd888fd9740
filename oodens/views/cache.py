"""The view cache (DESIGN.md sections 2 and 8); the view types are in :mod:`oodens.views.types`.

A view is what a detector reads: ``logits`` (n, C), ``features`` (n, D, the
penultimate layer after pooling) and ``labels`` (n,) of one mode on one dataset
split (the ``base`` view), plus views that need the network and the images with
parameters of their own (``odin[T,eps]`` and ``rankfeat[...]`` logits, see
:mod:`oodens.views.extract`), and the mode's final layer (``head``: weight, bias). Views
are computed once per mode, dataset and parameters, and cached on disk:

    <cache>/views/v<FORMAT>/<checkpoint sha256[:16]>/<dataset>-<split>-<kind>-<key[:16]>/
        logits.npy  features.npy  labels.npy  meta.json

The key is the sha256 of (cache format, checkpoint sha256, dataset identity
including a content fingerprint, preprocessing preset, view kind and parameters). A view folder
is built under a temporary name and renamed into place when complete, so a killed
extraction never leaves a half-written view, and two processes racing on one view
both end up reading the same complete folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from oodens.runtime.paths import safe_name
from oodens.views.types import BASE, ViewSpec

FORMAT_VERSION = 1


def view_key(checkpoint_sha: str, dataset: dict, preset: dict, spec: ViewSpec = BASE, precision: str = "fp32") -> str:
    ident = {
        "format": FORMAT_VERSION,
        "checkpoint": checkpoint_sha,
        "dataset": dataset,
        "preset": preset,
        "view": spec.identity() if spec != BASE else "base",
    }
    if precision != "fp32":  # reduced-precision views are other views (fp32 keys stay as they were)
        ident["precision"] = precision
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ViewCache:
    """Content-addressed, crash-safe store of views."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.base = self.root / "views" / f"v{FORMAT_VERSION}"

    def path(self, checkpoint_sha: str, dataset: dict, preset: dict, spec: ViewSpec = BASE,
             precision: str = "fp32") -> Path:
        key = view_key(checkpoint_sha, dataset, preset, spec, precision)
        kind = "" if spec == BASE else f"{spec.kind}-"
        folder = f"{safe_name(dataset['name'])}-{dataset['split']}-{kind}{key[:16]}"
        return self.base / checkpoint_sha[:16] / folder

    @staticmethod
    def is_complete(path: Path) -> bool:
        return (path / "meta.json").is_file()

    @staticmethod
    def read(path: Path, mmap: bool = True) -> dict[str, np.ndarray]:
        """The arrays of one cached view folder, memory-mapped."""
        mode = "r" if mmap else None
        return {p.stem: np.load(p, mmap_mode=mode, allow_pickle=False) for p in sorted(path.glob("*.npy"))}

    def clean_stale(self, folder: Path) -> None:
        """Remove temporary folders left by processes that no longer exist (e.g. killed)."""
        if not folder.is_dir():
            return
        for tmp in folder.glob(".tmp-*"):
            try:
                pid = int(tmp.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)

    def writer(self, final: Path, meta: dict) -> "ViewWriter":
        return ViewWriter(final, meta)


class ViewWriter:
    """Streams arrays batch by batch into memory-mapped .npy files in a temp folder,
    then publishes the folder atomically with :meth:`commit`."""

    def __init__(self, final: Path, meta: dict):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.meta = meta
        self.arrays: dict[str, np.memmap] = {}

    def allocate(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        arr = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.arrays[name] = arr
        return arr

    def commit(self) -> Path:
        for name, arr in self.arrays.items():
            arr.flush()
            with open(self.tmp / f"{name}.npy", "rb+") as f:
                os.fsync(f.fileno())
        self.arrays.clear()
        with open(self.tmp / "meta.json", "w") as f:
            json.dump(self.meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            # another process published the same view first: same key, same content
            if not ViewCache.is_complete(self.final):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        _fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
