"""Dataset sources: one split of one dataset, in its usual on-disk format.

Every source knows its identity (name, split and a fingerprint), which is part of
every view's cache key, and yields preprocessed batches for extraction. File-based
sources fingerprint their file list (relative names and sizes) without reading the
images, so a warm cache costs no image I/O; in-memory sources hash their content.

Formats: arrays in memory (the digits benchmark), CIFAR-10/100 python batches (as
torchvision writes them), SVHN ``.mat`` files, image folders (any depth, sorted; an
ImageFolder layout gives class labels), OpenOOD image lists ("relative/path label"
per line), and wrappers for a seeded subsample and for corrupted copies.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from abc import ABC, abstractmethod
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oodens.data.presets import Preset
from oodens.errors import OodensError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_tensor(img) -> torch.Tensor:
    """uint8 HWC / HW array or PIL image -> float CHW in [0, 1]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.array(a.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)


def resize_crop(img: Image.Image, preset: Preset) -> Image.Image:
    """The preset's geometry, as torchvision's ``Resize(resize)`` + ``CenterCrop(crop or resize)`` on a PIL image:
    the shorter side becomes ``resize`` and the longer ``int(resize * longer / shorter)`` (bilinear), then the
    centre crop (offsets rounded)."""
    if preset.resize is None:
        return img
    w, h = img.size
    size = preset.resize
    new = (size, max(1, int(size * h / w))) if w <= h else (max(1, int(size * w / h)), size)
    if new != (w, h):
        img = img.resize(new, Image.BILINEAR)
    side = preset.crop or preset.resize
    w, h = img.size
    if (w, h) != (side, side):
        left, top = int(round((w - side) / 2)), int(round((h - side) / 2))
        img = img.crop((left, top, left + side, top + side))
    return img


def to_image(img, channels: int, preset: Preset | None = None) -> Image.Image:
    """A PIL image or uint8 array as a PIL image in ``channels`` channels (RGB, or grey for 1),
    through the preset's geometry when given."""
    if not isinstance(img, Image.Image):
        a = np.asarray(img)
        img = Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    img = img.convert("RGB" if channels == 3 else "L")
    return img if preset is None else resize_crop(img, preset)


class LoadError(OodensError):
    """A sample that cannot be loaded (a corrupt image...): one line naming the file and the reason.

    Raised inside DataLoader worker processes too. torch re-raises a worker's exception in the main
    process as ``type(text)`` where ``text`` is "Caught ... in DataLoader worker process N. Original
    Traceback ..." followed by the worker's whole traceback; this class keeps the original one-line
    message only, so the command line still prints one line."""

    def __init__(self, text: str = ""):
        text = str(text)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            tag = f"{type(self).__name__}: "
            last = text.rstrip().rsplit("\n", 1)[-1]
            if tag in last:
                text = last.split(tag, 1)[1].strip()
            else:  # not the traceback's last line: the first line that names this class
                text = next((ln.split(tag, 1)[1].strip() for ln in reversed(text.splitlines()) if tag in ln), text)
        super().__init__(text)


def load_item(get: Callable[[int], tuple[object, int]], i: int, what: object) -> tuple[object, int]:
    """``get(i)``, any failure a :class:`LoadError` naming ``what`` (the source) and sample ``i``; errors that
    already name their file (an :class:`OodensError` such as ``cannot read image PATH: ...``) keep their text."""
    try:
        return get(i)
    except LoadError:
        raise
    except OodensError as e:
        raise LoadError(str(e)) from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LoadError(f"cannot load sample {i} of {what}: {reason} (expected a readable image)") from None


class _Items(Dataset):
    """Indexable (image, label) -> (normalised tensor, label) through a preset.

    Images are converted to the preset's channel count (RGB, or grey for 1-channel presets). A sample
    that cannot be loaded is a one-line :class:`LoadError` naming it, also from DataLoader workers."""

    def __init__(self, n: int, get: Callable[[int], tuple[object, int]], preset: Preset, channels: int):
        self.n, self.get, self.preset, self.channels = n, get, preset, channels

    def __len__(self):
        return self.n

    def _load(self, i):
        img, label = self.get(i)
        if isinstance(img, torch.Tensor):  # already a float CHW tensor in [0, 1]
            x = img
        else:
            x = to_tensor(to_image(img, self.channels, self.preset))
        return self.preset.normalize(x[None])[0], label

    def __getitem__(self, i):
        return load_item(self._load, i, getattr(self.get, "__self__", "the dataset"))


class DataSource(ABC):
    """One split of one dataset."""

    #: images in this many channels (3 for RGB datasets, 1 for digits)
    channels: int = 3

    def __init__(self, name: str, split: str):
        self.name, self.split = name, split

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, {self.split!r})"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def item(self, i: int) -> tuple[object, int]:
        """The i-th (image, label): a PIL image / uint8 array, or a float CHW tensor in [0, 1]."""

    @property
    @abstractmethod
    def fingerprint(self) -> str: ...

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.item(i)[1] for i in range(len(self))], dtype=np.int64)

    def identity(self) -> dict:
        return {"name": self.name, "split": self.split, "fingerprint": self.fingerprint}

    def loader(self, preset: Preset, batch_size: int, workers: int = 0) -> DataLoader:
        """Batches of (preprocessed images, labels) in dataset order."""
        ds = _Items(len(self), self.item, preset, len(preset.mean))
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)


class ArraySource(DataSource):
    """Images held in memory: float (N, C, H, W) in [0, 1] or uint8 (N, H, W, C), built lazily by ``build``."""

    def __init__(self, name: str, split: str, build: Callable[[], tuple[np.ndarray, np.ndarray]],
                 fingerprint: str | None = None):
        super().__init__(name, split)
        self.build = build
        self._fingerprint = fingerprint

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.build()
        if x.dtype != np.uint8:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return x, np.ascontiguousarray(y, dtype=np.int64)

    @property
    def channels(self) -> int:
        x = self.arrays[0]
        return x.shape[1] if x.dtype != np.uint8 else (x.shape[3] if x.ndim == 4 else 1)

    def __len__(self):
        return len(self.arrays[1])

    def item(self, i):
        x, y = self.arrays
        img = torch.from_numpy(x[i]) if x.dtype != np.uint8 else x[i]
        return img, int(y[i])

    @property
    def labels(self):
        return self.arrays[1]

    @cached_property
    def fingerprint(self) -> str:
        if self._fingerprint:
            return self._fingerprint
        x, y = self.arrays
        h = hashlib.sha256()
        h.update(f"{x.shape}{x.dtype}".encode())
        h.update(x.tobytes())
        h.update(y.tobytes())
        return h.hexdigest()

    def loader(self, preset: Preset, batch_size: int, workers: int = 0) -> DataLoader:
        x, y = self.arrays
        if x.dtype != np.uint8 and (preset.resize is None or preset.resize == x.shape[-1] == x.shape[-2]):
            # already float CHW at the right size: normalise the whole array at once
            xs = preset.normalize(torch.from_numpy(x))
            return DataLoader(torch.utils.data.TensorDataset(xs, torch.from_numpy(y)), batch_size=batch_size)
        return super().loader(preset, batch_size, workers)


def files_fingerprint(root: Path, files: list[Path], extra: str = "") -> str:
    """sha256 of the relative file names and sizes (no image is read)."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f"{f.relative_to(root) if f.is_relative_to(root) else f}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


class _DataUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: accept only the numpy pieces they are made of."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")


def read_cifar_batch(path: Path) -> dict:
    """A CIFAR python batch as a dict with str keys: the original batches (Python 2 pickles) have str keys,
    a batch re-saved by Python 3 has bytes keys (``b"data"``); both are accepted."""
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="latin1").load()
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise OodensError(f"cannot read CIFAR batch {path}: {reason} (expected torchvision's python format)") from e
    if not isinstance(d, dict):
        raise OodensError(f"CIFAR batch {path} holds a {type(d).__name__}: expected a dict with data and labels "
                          f"(torchvision's python format)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


class CifarSource(ArraySource):
    """CIFAR-10 / CIFAR-100 in torchvision's python format.

    ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
    ``root/cifar-100-python/{train,test}`` (``root`` itself holding the files also works).
    """

    LAYOUT = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
    }

    def __init__(self, name: str, split: str, root: Path, num_classes: int):
        sub, train, test, self.key = self.LAYOUT[num_classes]
        root = Path(root)
        folder = root / sub if (root / sub).is_dir() else root
        self.files = [folder / f for f in (train if split == "train" else test)]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(missing[0])
        super().__init__(name, split, self._read, files_fingerprint(folder, self.files, f"cifar{num_classes}"))

    def _read(self):
        xs, ys = [], []
        for f in self.files:
            d = read_cifar_batch(f)
            lacking = [k for k in ("data", self.key) if k not in d]
            if lacking:
                raise OodensError(f"CIFAR batch {f} has no {lacking[0]!r} key (keys: "
                                  f"{', '.join(map(str, list(d)[:6])) or 'none'}): expected data and {self.key}")
            try:
                x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                y = np.asarray(d[self.key], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as e:
                raise OodensError(f"CIFAR batch {f}: {e} (expected data of N x 3072 uint8 and N labels)") from None
            if len(x) != len(y):
                raise OodensError(f"CIFAR batch {f} has {len(x)} images but {len(y)} labels: expected one label each")
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)


class SvhnSource(ArraySource):
    """SVHN's ``test_32x32.mat`` (X: 32 x 32 x 3 x N uint8). Used as OOD: labels are -1."""

    def __init__(self, name: str, split: str, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        super().__init__(name, split, self._read, files_fingerprint(self.path.parent, [self.path], "svhn"))

    def _read(self):
        from scipy.io import loadmat

        try:
            x = loadmat(str(self.path), variable_names=["X"])["X"]
        except Exception as e:
            raise OodensError(f"cannot read SVHN file {self.path}: {e} (expected test_32x32.mat with X)") from e
        x = np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(3, 0, 1, 2))
        return x, np.full(len(x), -1, dtype=np.int64)


JPEG_SUFFIXES = (".jpg", ".jpeg")


def decode_jpeg_file(path: Path) -> Image.Image | None:
    """A JPEG decoded by torchvision's libjpeg-turbo decoder (``torchvision.io.decode_jpeg``: the pixels Pillow
    gives, without its per-file overhead) as a PIL image in the mode Pillow would open it in (L or RGB); None
    where that does not apply (a CMYK JPEG, an unreadable file, torchvision not loaded: importing it costs
    seconds, which extraction pays only for large image lists): the caller uses Pillow."""
    if "torchvision.io" not in sys.modules:
        return None
    try:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            t = decode_jpeg(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8),
                            mode=ImageReadMode.UNCHANGED)
    except Exception:  # noqa: BLE001 (Pillow decodes it again and names the file in its error)
        return None
    if t.shape[0] == 1:
        return Image.fromarray(t[0].numpy())  # L
    if t.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy()))  # RGB
    return None


class FileListSource(DataSource):
    """Images given as (path, label) pairs, read on demand. ``geometry=False``: the images are used at their own
    size, the preset's resize and crop skipped (OpenOOD feeds ImageNet-C this way), normalisation kept."""

    def __init__(self, name: str, split: str, root: Path, items: list[tuple[Path, int]], kind: str,
                 geometry: bool = True):
        super().__init__(name, split)
        if not items:
            raise OodensError(f"{name}: no images under {root} (expected {', '.join(IMAGE_SUFFIXES[:4])} files)")
        self.root, self.items = Path(root), items
        self.geometry = geometry
        self._kind = kind if geometry else f"{kind}-as-is"

    def loader(self, preset: Preset, batch_size: int, workers: int = 0) -> DataLoader:
        if not self.geometry:
            preset = replace(preset, resize=None, crop=None)
        return super().loader(preset, batch_size, workers)

    def __len__(self):
        return len(self.items)

    def item(self, i):
        path, label = self.items[i]
        if path.suffix.lower() in JPEG_SUFFIXES:
            img = decode_jpeg_file(path)
            if img is not None:
                return img, label
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy(), label
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise LoadError(f"cannot read image {path}: {reason} (expected an image file PIL can decode)") from None

    @property
    def labels(self):
        return np.array([lab for _, lab in self.items], dtype=np.int64)

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self._kind.encode())
        for path, label in self.items:
            rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            h.update(f"{rel}\0{label}\0{path.stat().st_size}\n".encode())
        return h.hexdigest()


def image_folder(name: str, split: str, root: Path, labelled: bool) -> FileListSource:
    """Every image under ``root`` (sorted). ``labelled``: ImageFolder classes = sorted subfolders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if labelled:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        index = {c: i for i, c in enumerate(classes)}
        items = [(f, index[f.relative_to(root).parts[0]]) for f in files if len(f.relative_to(root).parts) > 1]
    else:
        items = [(f, -1) for f in files]
    return FileListSource(name, split, root, items, "folder-labelled" if labelled else "folder")


def image_list(name: str, split: str, listfile: Path, root: Path, labelled: bool = False,
               geometry: bool = True) -> FileListSource:
    """An OpenOOD image list: "relative/path label" per line, paths relative to ``root``; a listed image that is
    not on disk is a one-line error naming the list, the line and the path. ``labelled``: keep the labels (ID
    splits, covariate-shifted ID sets), else -1 (OOD sets); ``geometry``: see :class:`FileListSource`."""
    listfile, root = Path(listfile), Path(root)
    if not listfile.is_file():
        raise FileNotFoundError(listfile)
    items = []
    for n, line in enumerate(listfile.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        rel, label = (parts[0], parts[1]) if len(parts) == 2 and parts[1].lstrip("-").isdigit() else (line.strip(), -1)
        path = root / rel
        if not path.is_file():
            raise OodensError(f"{listfile}:{n}: image {path} does not exist (expected paths relative to {root})")
        items.append((path, int(label) if labelled else -1))
    return FileListSource(name, split, root, items, "imglist", geometry)


class IndexSource(DataSource):
    """The samples of another source at the given indices, in that order."""

    def __init__(self, source: DataSource, index: np.ndarray):
        super().__init__(source.name, source.split)
        self.source, self.index = source, np.asarray(index, dtype=np.int64)
        self.channels = source.channels

    def __len__(self):
        return len(self.index)

    def item(self, i):
        return self.source.item(int(self.index[i]))

    @property
    def labels(self):
        return np.asarray(self.source.labels)[self.index]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source.fingerprint.encode() + self.index.tobytes()).hexdigest()


class SubsetSource(IndexSource):
    """A seeded random subsample (sorted indices) of another source: ``--fit-fraction``."""

    def __init__(self, source: DataSource, fraction: float, seed: int = 0):
        if not 0 < fraction <= 1:
            raise OodensError(f"--fit-fraction {fraction}: expected a fraction in (0, 1]")
        n = len(source)
        k = max(1, int(round(n * fraction)))
        super().__init__(source, np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)))
        self.fraction, self.seed = fraction, seed

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.source.fingerprint}/{self.fraction}/{self.seed}".encode()).hexdigest()

    def identity(self) -> dict:
        return {**self.source.identity(), "fingerprint": self.fingerprint, "fraction": self.fraction, "seed": self.seed}


#: the ID validation hold-out of a benchmark that names no validation split of its own: this fraction of the ID
#: training split, at most ``VAL_CAP`` samples, class-stratified, drawn with ``VAL_SEED``
VAL_FRACTION = 0.1
VAL_CAP = 5000
VAL_SEED = 0


def stratified_holdout(labels: np.ndarray, fraction: float = VAL_FRACTION, cap: int = VAL_CAP,
                       seed: int = VAL_SEED) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified hold-out: n_val = min(round(fraction * n), cap) samples,
    allotted to the classes in proportion to their sizes (largest remainders), never a class's last sample
    (every class stays in the rest), each class's samples drawn by one seeded permutation."""
    labels = np.asarray(labels)
    n = len(labels)
    n_val = min(int(round(n * fraction)), cap)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n_val * counts / max(n, 1)
    take = np.floor(quota).astype(np.int64)
    for c in np.argsort(-(quota - take), kind="stable")[: n_val - int(take.sum())]:
        take[c] += 1
    take = np.minimum(take, counts - 1)
    rng = np.random.default_rng(seed)
    parts = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


class HoldOutSource(IndexSource):
    """One part of the ID validation hold-out of a training split (:func:`stratified_holdout`): ``part="val"``
    the held-out samples (split ``val``), ``part="fit"`` the rest (the source's split; detectors fit on it, so a
    held-out sample is never in a knn bank). Both parts have their own fingerprint, so their cached views never
    collide with the whole split's."""

    PARTS = ("fit", "val")

    def __init__(self, source: DataSource, part: str, fraction: float = VAL_FRACTION, cap: int = VAL_CAP,
                 seed: int = VAL_SEED):
        if part not in self.PARTS:
            raise OodensError(f"hold-out part {part!r}: expected one of {', '.join(self.PARTS)}")
        held = stratified_holdout(np.asarray(source.labels), fraction, cap, seed)
        index = held if part == "val" else np.setdiff1d(np.arange(len(source)), held)
        super().__init__(source, index)
        self.split = "val" if part == "val" else source.split
        self.part, self.fraction, self.cap, self.seed = part, fraction, cap, seed

    def holdout(self) -> dict:
        return {"part": self.part, "fraction": self.fraction, "cap": self.cap, "seed": self.seed}

    def identity(self) -> dict:
        return {**self.source.identity(), "split": self.split, "fingerprint": self.fingerprint,
                "holdout": self.holdout()}
