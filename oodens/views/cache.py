"""The view cache (DESIGN.md sections 2 and 8); the view types are in :mod:`oodens.views.types`.

A view is what a detector reads: ``logits`` (n, C), ``features`` (n, D, the
penultimate layer after pooling) and ``labels`` (n,) of one mode on one dataset
split (the ``base`` view), plus views that need the network and the images with
parameters of their own (``odin[T,eps,eps_space]`` and ``rankfeat[...]`` logits; ``layers`` and
``gram[orders]``, one array ``layerNN.npy`` per feature layer; see :mod:`oodens.views.kinds`), and
the mode's final layer (``head``: weight, bias). Views are computed once per mode, dataset and
parameters, and cached on disk:

    <cache>/views/v<FORMAT>/<checkpoint sha256[:16]>/<dataset>-<split>-<kind>-<key[:16]>/
        logits.npy  features.npy  labels.npy  meta.json          (base)
        layer00.npy  layer01.npy ...  meta.json                  (layers, gram)
    <cache>/views/v<FORMAT>/<checkpoint sha256[:16]>/<dataset>-<split>-<kind>-<key[:16]>.lock

The key is the sha256 of (cache format, checkpoint sha256, the model the checkpoint is read as:
architecture and head width, dataset identity including a content fingerprint, preprocessing
preset, view kind and parameters). A view folder is built under a temporary name and renamed into
place when complete, so a killed extraction never leaves a half-written view.

Integrity: ``meta.json`` records, for every array file, its size, mtime, sha256, shape and dtype.
A view is used only if every recorded file exists with that npy header and size; a file whose
size or mtime differs from the record is hashed in full (a copied cache still matches, and its
record is refreshed). Anything else (a damaged or missing file, a folder without ``meta.json``)
makes the view unusable: extraction reports it and recomputes it (:meth:`ViewCache.problem`).

Writes: each .npy file is preallocated (``posix_fallocate``, not sparse), so a full disk is an
``OSError`` when the space is reserved, turned into one :class:`~oodens.errors.OodensError` line
naming the file and the bytes needed, and the temporary folder is removed. A commit fsyncs every
array, meta.json and the temporary folder, then renames the folder into place and fsyncs its parent;
the views of one extraction pass are committed together (:meth:`ViewWriter.commit_all`: their fsyncs
at once, each view still published by its own rename).

Concurrency: extraction holds an advisory lock (``flock`` on ``<view folder>.lock``) while it
computes a view, so concurrent runs compute each view once; the kernel drops the lock of a
process that dies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodens.errors import OodensError
from oodens.modes.checkpoints import sha256_file
from oodens.runtime.paths import safe_name
from oodens.views.types import BASE, ViewSpec

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows): no advisory locks, concurrent runs may compute twice
    fcntl = None

#: 2: meta.json records each array's size, mtime, sha256, shape and dtype; the key holds the model
#: (architecture, head width). 3: resizing rounds the longer side down as torchvision's Resize (it rounded
#: to nearest), so a non-square image's views may differ by a pixel row. Views of older formats
#: (``views/v1``, ``views/v2``) are not read: they are recomputed.
FORMAT_VERSION = 3


def view_key(checkpoint_sha: str, dataset: dict, preset: dict, spec: ViewSpec = BASE, precision: str = "fp32",
             model: dict | None = None) -> str:
    """``model``: what the checkpoint is read as (``{"arch": ..., "num_outputs": ...}``); a view is only
    valid for the network it came from, so another architecture or head width is another view."""
    ident = {
        "format": FORMAT_VERSION,
        "checkpoint": checkpoint_sha,
        "dataset": dataset,
        "preset": preset,
        "view": spec.identity() if spec != BASE else "base",
    }
    if model is not None:
        ident["model"] = model
    if precision != "fp32":  # reduced-precision views are other views
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


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    """fsync a folder (its entries) or, with ``os.O_RDWR``, a file."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)


def _fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDWR)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy file's header; ValueError when it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format {version}")
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), dtype, f.tell()


@dataclass(frozen=True)
class Problem:
    """Why a view folder cannot be used: ``file`` (``logits.npy``, ``meta.json``; None: no folder) and ``reason``."""

    file: str | None
    reason: str

    @property
    def missing(self) -> bool:
        """Never written (no folder): computed without a word."""
        return self.file is None

    @property
    def state(self) -> str:
        return "incomplete" if self.reason.startswith("no meta.json") else "damaged"


MISSING = Problem(None, "not cached")


def _unwritable(root: Path, e: OSError) -> OodensError:
    where = f" ({e.filename})" if e.filename else ""
    return OodensError(f"view cache {root} is not writable: {e.strerror or e}{where}: expected a writable folder "
                       f"for the views it lacks; point --cache-dir elsewhere")


def _write_error(e: OSError, path: Path, needed: int | None = None) -> OodensError:
    """An OSError while writing a view file as one line: the path, and for a full disk the bytes needed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = path.parent
        while not where.exists() and where != where.parent:  # the view folder is not published yet
            where = where.parent
        try:
            free = f" (free: {human_bytes(shutil.disk_usage(where).free)})"
        except OSError:
            free = ""
        need = f": needs {human_bytes(needed)}{free}" if needed is not None else free
        return OodensError(f"no space left on device for view {path}{need}: free space or point --cache-dir "
                           f"elsewhere")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OodensError(f"cannot write view {path}: {e.strerror}: expected a writable cache folder; point "
                           f"--cache-dir elsewhere")
    return OodensError(f"cannot write view {path}: {e.strerror or e} (errno {e.errno}): nothing was published; "
                       f"check the disk or point --cache-dir elsewhere")


class ViewCache:
    """Content-addressed, crash-safe store of views."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.base = self.root / "views" / f"v{FORMAT_VERSION}"

    def path(self, checkpoint_sha: str, dataset: dict, preset: dict, spec: ViewSpec = BASE,
             precision: str = "fp32", model: dict | None = None) -> Path:
        key = view_key(checkpoint_sha, dataset, preset, spec, precision, model)
        kind = "" if spec == BASE else f"{spec.kind}-"
        folder = f"{safe_name(dataset['name'])}-{dataset['split']}-{kind}{key[:16]}"
        return self.base / checkpoint_sha[:16] / folder

    @staticmethod
    def problem(path: Path) -> Problem | None:
        """None when the view folder is complete and intact, else why not (:data:`MISSING`: no folder).

        Cheap for an intact view: meta.json, one stat and one npy header per array. A file whose size
        or mtime differs from the record is hashed; if the hash still matches (a copied cache), the
        record is refreshed so the next read is cheap again."""
        path = Path(path)
        if not path.exists():
            return MISSING
        if not path.is_dir():
            return Problem(path.name, "not a folder")
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return Problem("meta.json", "no meta.json: an interrupted write")
        except (OSError, ValueError) as e:
            return Problem("meta.json", f"unreadable: {type(e).__name__}")
        arrays = meta.get("arrays") if isinstance(meta, dict) else None
        if not isinstance(arrays, dict) or not arrays:
            return Problem("meta.json", "no checksums recorded")
        refreshed = False
        for name, rec in arrays.items():
            f = path / f"{name}.npy"
            try:
                want_shape, want_dtype = tuple(rec["shape"]), np.dtype(rec["dtype"])
                size, mtime, digest = int(rec["size"]), int(rec["mtime_ns"]), str(rec["sha256"])
            except (KeyError, TypeError, ValueError):
                return Problem("meta.json", f"malformed record of {f.name}")
            try:
                st = f.stat()
            except FileNotFoundError:
                return Problem(f.name, "file missing")
            except OSError as e:
                return Problem(f.name, f"unreadable: {e.strerror}")
            try:
                shape, dtype, offset = _npy_header(f)
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                return Problem(f.name, f"bad npy header: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}")
            if shape != want_shape or dtype != want_dtype:
                return Problem(f.name, f"header says {dtype.str}{list(shape)}, recorded {want_dtype.str}"
                                       f"{list(want_shape)}")
            expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if st.st_size != expected:
                return Problem(f.name, f"truncated: {st.st_size} bytes, expected {expected}")
            if st.st_size != size or st.st_mtime_ns != mtime:
                try:
                    actual = sha256_file(f)
                except OSError as e:
                    return Problem(f.name, f"unreadable: {e.strerror}")
                if actual != digest:
                    return Problem(f.name, "checksum mismatch")
                rec["size"], rec["mtime_ns"] = st.st_size, st.st_mtime_ns
                refreshed = True
        if refreshed:
            _replace_json(path / "meta.json", meta)
        return None

    @staticmethod
    def is_complete(path: Path) -> bool:
        """The view folder is complete and intact (:meth:`problem` is None)."""
        return ViewCache.problem(path) is None

    @staticmethod
    def read(path: Path, mmap: bool = True) -> dict[str, np.ndarray]:
        """The arrays of one cached view folder (those its meta.json records), memory-mapped."""
        mode = "r" if mmap else None
        try:
            names = sorted(json.loads((Path(path) / "meta.json").read_text())["arrays"])
        except (OSError, ValueError, KeyError, TypeError):
            names = sorted(p.stem for p in Path(path).glob("*.npy"))
        return {n: np.load(Path(path) / f"{n}.npy", mmap_mode=mode, allow_pickle=False) for n in names}

    def clean_stale(self, folder: Path) -> None:
        """Remove temporary and set-aside folders left by processes that no longer exist (e.g. killed)."""
        if not folder.is_dir():
            return
        for tmp in [*folder.glob(".tmp-*"), *folder.glob(".damaged-*")]:
            try:
                pid = int(tmp.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)

    def discard(self, path: Path) -> None:
        """Move an unusable view folder aside (atomically: no one reads half of it) and remove it."""
        try:
            _set_aside(path)
        except OSError as e:
            raise _unwritable(self.root, e) from e

    @contextlib.contextmanager
    def lock(self, path: Path):
        """Hold the advisory lock of one view (blocking) while the block runs: concurrent runs compute a view
        once. The lock is ``flock`` on ``<view folder>.lock``: the kernel releases it when its process dies."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _unwritable(self.root, e) from e
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as e:  # a file system without locks (some network mounts): go on unlocked
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
            yield
        finally:
            os.close(fd)

    def writer(self, final: Path, meta: dict) -> "ViewWriter":
        try:
            return ViewWriter(final, meta)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise _write_error(e, Path(final)) from e
            raise _unwritable(self.root, e) from e


def _set_aside(path: Path) -> None:
    aside = path.parent / f".damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # someone else set it aside first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _replace_json(path: Path, data: dict) -> None:
    """Best effort (a read-only cache keeps its record): write a sibling and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _reserve(path: Path) -> int:
    """Allocate the disk blocks of a (sparse) file up to its size, so later writes through a memory map
    cannot fail with SIGBUS on a full disk: a full disk is an OSError here. Returns the size in bytes."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
                return size
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        # no fallocate here: ordinary writes of the data region (zeros, as the sparse file reads)
        start = _npy_header(path)[2]
        chunk = bytes(1 << 22)
        pos = start
        while pos < size:
            pos += os.pwrite(fd, chunk[: min(len(chunk), size - pos)], pos)
        os.fsync(fd)
        return size
    finally:
        os.close(fd)


#: Linux's fsync writes back the pages dirtied through a memory map (its msync(MS_SYNC) is an fsync of the
#: mapped range): one sync per file there; elsewhere the maps are flushed (msync) before the fsync
_FSYNC_WRITES_MAPS = sys.platform.startswith("linux")
#: at most this many files synced or hashed at once by a commit (fsync waits on the disk and hashlib releases
#: the GIL; the file system joins concurrent fsyncs into few journal commits)
SYNC_THREADS = 16


def _each(fn, items) -> list:
    """``[fn(x) for x in items]``, run concurrently (disk waits and hashing); the first error is raised."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(len(items), SYNC_THREADS), thread_name_prefix="oodens-commit") as pool:
        return list(pool.map(fn, items))


class _Failed(Exception):
    """An OSError of one writer's commit step (which view to name in the one-line error)."""

    def __init__(self, writer: "ViewWriter", error: OSError):
        super().__init__(str(error))
        self.writer, self.error = writer, error


def _step(writer: "ViewWriter", fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        raise _Failed(writer, e) from e


class ViewWriter:
    """Streams arrays batch by batch into preallocated memory-mapped .npy files in a temp folder,
    then publishes the folder atomically with :meth:`commit`, recording each file's checksum.

    Write failures (a full disk, an I/O error) remove the temp folder and raise :class:`OodensError`."""

    def __init__(self, final: Path, meta: dict):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.meta = meta
        self.arrays: dict[str, np.memmap] = {}
        self.names: list[str] = []
        self.committed = False

    def allocate(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        file = self.tmp / f"{name}.npy"
        needed = arr = None
        try:
            arr = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
            needed = os.stat(file).st_size
            _reserve(file)
        except OSError as e:
            arr = None  # unmapped, so the temp folder's space is free again when the message counts it
            self.abort()
            if needed is None:
                needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            raise _write_error(e, self.final / file.name, needed) from e
        self.arrays[name] = arr
        self.names.append(name)
        return arr

    def commit(self) -> Path:
        """Publish the view (once: a committed writer's commit does nothing more)."""
        ViewWriter.commit_all([self])
        return self.final

    @staticmethod
    def commit_all(writers: list["ViewWriter"]) -> None:
        """Publish several views together: per view exactly what :meth:`commit` does (its arrays and meta.json
        fsynced in the temp folder, then the folder renamed into place, so each view appears whole or not at
        all), with the disk waits of all their files overlapped. A failure is one :class:`OodensError` naming
        its view; the views not yet published are removed (those published stay: each is complete)."""
        writers = [w for w in dict.fromkeys(writers) if not w.committed]
        try:
            ViewWriter._commit_all(writers)
        except _Failed as f:
            for w in writers:
                if not w.committed:
                    w.abort()
            raise _write_error(f.error, f.writer.final) from f.error

    @staticmethod
    def _commit_all(writers: list["ViewWriter"]) -> None:
        for w in writers:
            if not _FSYNC_WRITES_MAPS:
                for arr in w.arrays.values():
                    _step(w, arr.flush)
            w.arrays.clear()
        # each array's record; the mtime is final (the maps are written), and the bytes hashed are the page
        # cache's, the ones the fsync below writes
        files = [(w, name) for w in writers for name in w.names]
        records = _each(lambda f: _step(f[0], f[0]._record, f[1]), files)
        for w in writers:
            arrays = {name: rec for (v, name), rec in zip(files, records) if v is w}
            _step(w, w._write_meta, {**w.meta, "format": FORMAT_VERSION, "arrays": arrays})
        # every file, and the temp folder's entries (all created by now), on disk before any rename
        _each(lambda f: _step(f[0], f[1], f[2]),
              [(w, _fsync_file, w.tmp / f"{name}.npy") for w, name in files]
              + [(w, _fsync_file, w.tmp / "meta.json") for w in writers] + [(w, _fsync_dir, w.tmp) for w in writers])
        for w in writers:
            _step(w, w._publish)
        parents = {}
        for w in writers:
            parents.setdefault(w.final.parent, w)
        _each(lambda item: _step(item[1], _fsync_dir, item[0]), parents.items())

    def _record(self, name: str) -> dict:
        file = self.tmp / f"{name}.npy"
        st = os.stat(file)
        shape, dtype, _ = _npy_header(file)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(file),
                "shape": list(shape), "dtype": dtype.str}

    def _write_meta(self, meta: dict) -> None:
        with open(self.tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    def _publish(self) -> None:
        """Rename the (synced) temp folder into place; the parent folder is synced after."""
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if ViewCache.problem(self.final) is None:
                # another process published the same view first: same key, same content
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:  # an unusable folder (e.g. no meta.json) is in the way: set it aside, publish ours
                _set_aside(self.final)
                os.rename(self.tmp, self.final)
        self.committed = True

    def abort(self) -> None:
        self.arrays.clear()
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
