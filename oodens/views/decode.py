"""Decoding image lists on the GPU: JPEG batches through nvJPEG (``torchvision.io.decode_jpeg(..., device=cuda)``),
the preset's geometry and normalisation on the device.

``--decode`` chooses where an image list's JPEGs are decoded during extraction:

- ``cpu``: every image is decoded on the CPU (torchvision's libjpeg-turbo or Pillow, in DataLoader workers) and
  resized by Pillow, the pixels Pillow gives (:mod:`oodens.data.sources`);
- ``gpu``: the DataLoader workers only read the files' bytes; each batch of JPEGs is decoded in one batched nvJPEG
  call on the extraction device, resized (bilinear, antialiased, rounded to 8 bits as Pillow does), centre-cropped
  and normalised there. Other files (PNG, ...) and JPEGs that nvJPEG refuses (CMYK, say) are decoded on the CPU and
  join the batch. nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, and the tensor resize from
  Pillow's by one grey level: on an H100 3/4 of the pixels of photo-like test JPEGs differed, by 2.6 grey levels on
  average (up to 87 at colour edges), and R50 logits by up to 1.7 (of 39; the same top class for every image;
  EXPERIMENTS.md). So views decoded on the GPU are other views (the decoder is part of their cache key), and the
  default stays ``cpu``: the pixels every published result was computed on;
- ``auto``: ``gpu`` when the extraction device is a CUDA device, else ``cpu``.

Only image lists change (ImageFolder, OpenOOD image lists, ImageNet); array datasets (CIFAR, SVHN, digits) have
no decoding and their views are the same whatever ``--decode`` says.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodens.data.presets import Preset
from oodens.data.sources import JPEG_SUFFIXES, FileListSource, IndexSource, LoadError, load_item, to_image
from oodens.errors import OodensError

DECODERS = ("auto", "cpu", "gpu")


def resolve_decode(decode: str, device: torch.device) -> str:
    """``cpu`` or ``gpu`` for ``--decode`` on this extraction device."""
    if decode not in DECODERS:
        raise OodensError(f"--decode {decode!r}: expected one of {', '.join(DECODERS)}")
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode == "gpu" and device.type != "cuda":
        raise OodensError(f"--decode gpu needs a CUDA extraction device, not {device} (expected --device cuda, "
                          f"or --decode cpu)")
    return decode


def file_list(source) -> tuple[FileListSource | None, np.ndarray | None]:
    """The image list ``source`` reads (through index sources: subsamples, hold-outs, torchrun shards) and the
    indices into it (None: all of it); (None, None) for other sources."""
    index = None
    while isinstance(source, IndexSource):
        index = source.index if index is None else source.index[index]
        source = source.source
    return (source, index) if isinstance(source, FileListSource) else (None, None)


def decodes_on_gpu(source, decode: str) -> bool:
    """Whether ``source`` is read by :func:`gpu_batches` under the resolved ``decode``: an image list."""
    return decode == "gpu" and file_list(source)[0] is not None


def preset_identity(preset: Preset, source, decode: str) -> dict:
    """The preset's part of a view's cache key: its identity, plus the decoder where it decides the pixels."""
    ident = preset.identity()
    return {**ident, "decoder": "nvjpeg"} if decodes_on_gpu(source, decode) else ident


class _Files(Dataset):
    """Sample i as (JPEG bytes as a uint8 tensor, label), or (a CPU-decoded CHW uint8 tensor, label) for other
    files: the workers read; the GPU decodes."""

    def __init__(self, source: FileListSource, index: np.ndarray | None, channels: int):
        self.source, self.index, self.channels = source, index, channels

    def __len__(self):
        return len(self.source) if self.index is None else len(self.index)

    def _load(self, i):
        i = i if self.index is None else int(self.index[i])
        path, label = self.source.items[i]
        if Path(path).suffix.lower() in JPEG_SUFFIXES:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise LoadError(f"cannot read image {path}: {e.strerror or e} (expected a readable file)") from None
            if not data:
                raise LoadError(f"cannot read image {path}: an empty file (expected a JPEG image)")
            return (True, torch.frombuffer(bytearray(data), dtype=torch.uint8), i), label
        return (False, _cpu_decode(self.source, i, self.channels), i), label

    def __getitem__(self, i):
        return load_item(self._load, i, self.source)


def _cpu_decode(source: FileListSource, i: int, channels: int) -> torch.Tensor:
    """Image i decoded on the CPU at its own size as CHW uint8 (``channels`` 3: RGB, 1: grey)."""
    img, _ = source.item(i)
    a = np.asarray(to_image(img, channels))
    return torch.from_numpy(np.ascontiguousarray(a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1).copy())


def _collate(items):
    return [x for x, _ in items], torch.tensor([y for _, y in items], dtype=torch.int64)


def _decode(source: FileListSource, items: list, channels: int, device: torch.device) -> list[torch.Tensor]:
    """CHW uint8 tensors on ``device``: the JPEGs in one batched nvJPEG call (one by one, and on the CPU for
    those it refuses, when the batch call fails), the others moved as decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(items)
    jpegs = [j for j, (is_jpeg, _, _) in enumerate(items) if is_jpeg]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        if jpegs:
            try:
                for j, t in zip(jpegs, decode_jpeg([items[j][1] for j in jpegs], mode=mode, device=device)):
                    out[j] = t
            except RuntimeError:  # a file nvJPEG refuses: the others one by one, that one on the CPU
                for j in jpegs:
                    try:
                        out[j] = decode_jpeg(items[j][1], mode=mode, device=device)
                    except RuntimeError:
                        out[j] = _cpu_decode(source, items[j][2], channels).to(device)
    for j, (is_jpeg, data, _) in enumerate(items):
        if not is_jpeg:
            out[j] = data.to(device, non_blocking=True)
    return out


def geometry(img: torch.Tensor, preset: Preset) -> torch.Tensor:
    """A CHW uint8 image through the preset's resize (shorter side, bilinear, antialiased, rounded to 8 bits) and
    centre crop, as :func:`oodens.data.sources.resize_crop` does with Pillow: float CHW in [0, 255]."""
    from torchvision.transforms.v2 import functional as TF

    x = img.float()
    if preset.resize is None:
        return x
    h, w = x.shape[-2:]
    size = preset.resize
    new = (max(1, int(size * h / w)), size) if w <= h else (size, max(1, int(size * w / h)))
    if new != (h, w):
        x = TF.resize(x, list(new), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = x.round_().clamp_(0, 255)
    side = preset.crop or preset.resize
    h, w = x.shape[-2:]
    if (h, w) != (side, side):
        top, left = int(round((h - side) / 2)), int(round((w - side) / 2))
        x = x[..., top : top + side, left : left + side]
    return x


def gpu_batches(source, presets: list[Preset], batch_size: int, workers: int,
                device: torch.device):
    """Batches of (one normalised tensor per preset on ``device``, labels): workers read the files, the device
    decodes (:func:`_decode`), resizes and normalises. Each image is read and decoded once whatever the number of
    presets."""
    channels = {len(p.mean) for p in presets}
    if len(channels) > 1:
        raise OodensError(f"--decode gpu: the modes' presets ({', '.join(p.name for p in presets)}) read images in "
                          f"different channel counts: expected one (or --decode cpu)")
    channels = channels.pop()
    source, index = file_list(source)
    loader = DataLoader(_Files(source, index, channels), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, persistent_workers=False)
    for items, labels in loader:
        imgs = _decode(source, items, channels, device)
        xs = []
        for p in presets:
            p = p if source.geometry else Preset(p.name, p.mean, p.std)
            batch = [geometry(img, p) for img in imgs]
            if len({tuple(b.shape) for b in batch}) > 1:
                raise OodensError(f"{source.name}-{source.split}: images of different sizes without a resize in "
                                  f"preset {p.name!r}: expected one size (or a preset that resizes)")
            xs.append(p.normalize(torch.stack(batch).div_(255.0)))
        yield tuple(xs), labels
