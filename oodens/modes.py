"""Modes: discovering the trained checkpoints (one per seed) in a mode-set folder.

Accepted layouts (DESIGN.md section 3)::

    DIR/seed-<S>/epoch150.pth          (mode-ensemble paper, CIFAR)
    DIR/seed-<S>/checkpoint.pth.tar    (mode-ensemble paper, ImageNet; oodens train)
    DIR/<any>/<one *.pth|*.pth.tar|*.pt|*.safetensors>

What each mode is (architecture, dataset, class count, preprocessing preset) comes
from the ``oodens.json`` sidecar beside the checkpoint, else from the path
``.../<Dataset>/<Arch>/<mode>/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from torch import nn

from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.checkpoints import CHECKPOINT_SUFFIXES, PREFERRED_NAMES, SIDECAR, load_weights, sha256_file
from oodens.errors import OodensError

#: dataset folder name (save/<Dataset>/...) -> (benchmark, number of classes, preset)
DATASET_DEFAULTS: dict[str, tuple[str, int, str]] = {
    "digits": ("digits", 6, "digits"),
}


@dataclass
class Mode:
    """One trained checkpoint (one seed) and what it is."""

    name: str
    checkpoint: Path
    arch: str
    dataset: str
    num_classes: int
    preset: str
    sidecar: dict = field(default_factory=dict, repr=False)

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.checkpoint)

    def load(self) -> nn.Module:
        """The network in eval mode on the CPU, weights loaded strictly."""
        model = create_model(self.arch, self.num_classes)
        load_weights(model, self.checkpoint, self.arch)
        return model.eval()


def _find_checkpoint(folder: Path) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    if not files:
        return None
    preferred = [p for p in files if p.name in PREFERRED_NAMES]
    if len(preferred) == 1:
        return preferred[0]
    if len(files) == 1:
        return files[0]
    raise OodensError(
        f"mode folder {folder} holds several checkpoints ({', '.join(p.name for p in files)}): "
        f"expected one, or one named {' or '.join(PREFERRED_NAMES)}"
    )


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _describe(name: str, ckpt: Path) -> Mode:
    folder = ckpt.parent
    meta: dict = {}
    side = folder / SIDECAR
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OodensError(f"cannot read sidecar {side}: {e} (expected JSON with arch, dataset, num_classes)") from e
    arch = meta.get("arch")
    dataset = meta.get("dataset")
    if arch is None or dataset is None:
        # save/<Dataset>/<Arch>/<mode>/file: infer from the path
        parents = folder.resolve().parents
        arch = arch or (parents[0].name if len(parents) > 0 else None)
        dataset = dataset or (parents[1].name if len(parents) > 1 else None)
    try:
        arch = canonical_arch(arch or "")
    except OodensError:
        raise OodensError(
            f"cannot tell the architecture of mode {folder}: no {SIDECAR} sidecar and the path is not "
            f".../<Dataset>/<Arch>/{folder.name} with a known Arch"
        ) from None
    defaults = DATASET_DEFAULTS.get(str(dataset).lower())
    num_classes = meta.get("num_classes", defaults[1] if defaults else None)
    preset = meta.get("preset", defaults[2] if defaults else None)
    if num_classes is None or preset is None:
        raise OodensError(
            f"cannot tell the class count and preprocessing of mode {folder}: expected a {SIDECAR} sidecar "
            f"or a path .../<Dataset>/<Arch>/{folder.name} with Dataset one of {', '.join(DATASET_DEFAULTS)}"
        )
    bench = defaults[0] if defaults else str(dataset).lower()
    return Mode(name, ckpt, arch, bench, int(num_classes), str(preset), meta)


def discover_modes(root: Path) -> list[Mode]:
    """Every mode under ``root``, sorted by name (seed-1000 before seed-1100), checked for consistency."""
    root = Path(root)
    if not root.exists():
        raise OodensError(f"modes folder {root} does not exist (expected a folder of mode folders like seed-*/)")
    if not root.is_dir():
        raise OodensError(f"--modes {root} is not a folder (expected a folder of mode folders like seed-*/)")
    found: list[tuple[str, Path]] = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        ckpt = _find_checkpoint(sub)
        if ckpt is not None:
            found.append((sub.name, ckpt))
    if not found:
        ckpt = _find_checkpoint(root)
        if ckpt is not None:  # the folder is itself one mode
            found.append((root.name, ckpt))
    if not found:
        raise OodensError(
            f"no modes in {root}: expected mode folders holding a checkpoint, like "
            f"seed-*/checkpoint.pth.tar or seed-*/epoch150.pth"
        )
    modes = [_describe(name, ckpt) for name, ckpt in found]
    check_consistent(modes)
    return modes


def check_consistent(modes: list[Mode]) -> None:
    """All modes of a set share architecture, dataset, class count and preprocessing."""
    first = modes[0]
    for m in modes[1:]:
        for attr in ("arch", "num_classes", "dataset", "preset"):
            if getattr(m, attr) != getattr(first, attr):
                raise OodensError(
                    f"mode {m.name} has {attr} {getattr(m, attr)!r} but mode {first.name} has "
                    f"{getattr(first, attr)!r}: all modes of a set must share {attr}"
                )


def mode_dir(out: Path, dataset_folder: str, arch: str, seed: int) -> Path:
    """``out/<Dataset>/<Arch>/seed-<S>``, the layout ``oodens train`` writes."""
    return Path(out) / dataset_folder / arch_folder(arch) / f"seed-{seed}"
