"""Modes: discovering the trained checkpoints (one per seed) in a mode-set folder.

Accepted layouts (DESIGN.md section 3)::

    DIR/seed-<S>/epoch150.pth          (mode-ensemble paper, CIFAR)
    DIR/seed-<S>/checkpoint.pth.tar    (mode-ensemble paper, ImageNet; oodens train)
    DIR/s<k>/best.ckpt                 (OpenOOD v1.5: a bare state dict; DIR = <bench>_<net>_<method>_...)
    DIR/<any>/<one *.pth|*.pth.tar|*.pt|*.ckpt|*.safetensors>

What each mode is (architecture, dataset, class count, preprocessing preset) comes
from the ``oodens.json`` sidecar beside the checkpoint, else from the path
``.../<Dataset>/<Arch>/<mode>/`` or an OpenOOD run folder name (:func:`openood_run`), else from the flags
(``--arch``, ``--num-classes``, ``--benchmark``); ``--preset`` overrides the preprocessing of the whole set. A flag
that contradicts the sidecar or the path is an error (a benchmark with the same classes, such as
``openood-cifar10`` for ``cifar10``, does not contradict), as is anything left unknown. A leave-out
member (ELOC) lists its ``kept_classes`` in the sidecar: ``num_classes`` is the dataset's, and its
head has one output per kept class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from torch import nn

from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.data.datasets import DATASETS, find_dataset
from oodens.errors import OodensError
from oodens.modes.checkpoints import CHECKPOINT_SUFFIXES, PREFERRED_NAMES, SIDECAR, load_weights, sha256_file


@dataclass(frozen=True)
class ModeFlags:
    """What the command line says about a mode set (None = not given)."""

    arch: str | None = None
    num_classes: int | None = None
    preset: str | None = None
    dataset: str | None = None


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

    @property
    def kept_classes(self) -> list[int] | None:
        """A leave-out member's classes (output j predicts class ``kept_classes[j]``); None for a mode
        that predicts all ``num_classes`` classes."""
        kept = self.sidecar.get("kept_classes")
        return [int(c) for c in kept] if kept else None

    @property
    def num_outputs(self) -> int:
        """Width of the network's head: ``num_classes``, or the number of kept classes of a leave-out member."""
        return len(self.kept_classes) if self.kept_classes else self.num_classes

    def load(self) -> nn.Module:
        """The network in eval mode on the CPU, weights loaded strictly."""
        model = create_model(self.arch, self.num_outputs)
        load_weights(model, self.checkpoint, self.arch)
        return model.eval()


#: ``oodens train``'s resumable state (``<mode set>/seed-<S>.last.pth``): never a mode
RESUME_SUFFIX = ".last.pth"


def _find_checkpoint(folder: Path) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES)
                   and not p.name.endswith(RESUME_SUFFIX))
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


def _pick(what: str, folder: Path, *candidates: tuple[str, object], key=lambda v: str(v).lower()):
    """First known value among (source, value) pairs; a flag that disagrees (by ``key``) is an error."""
    known = [(src, v) for src, v in candidates if v is not None]
    if not known:
        return None
    src0, v0 = known[0]
    for src, v in known[1:]:
        if src == "flag" and key(v) != key(v0):
            raise OodensError(f"--{what} {v} contradicts the {src0} of mode {folder} ({what} {v0}): "
                              f"expected them to agree, or drop the flag")
    return v0


#: sidecar keys discovery reads, with the type each must have
SIDECAR_TYPES = {"arch": (str, "a string"), "dataset": (str, "a string"), "num_classes": (int, "a positive integer"),
                 "preset": (str, "a string"), "kept_classes": (list, "a list of class indices")}


def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def read_sidecar(side: Path) -> dict:
    """The ``oodens.json`` beside a checkpoint, its keys checked: a JSON object whose ``arch``, ``dataset``,
    ``preset`` are strings, ``num_classes`` a positive integer, ``kept_classes`` a list of integers."""
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OodensError(f"cannot read sidecar {side}: {e} (expected JSON with arch, dataset, num_classes)") from e
    if not isinstance(meta, dict):
        raise OodensError(f"sidecar {side} is {_json_type(meta)}: expected a JSON object with arch, dataset, "
                          f"num_classes")
    for key, (typ, expected) in SIDECAR_TYPES.items():
        v = meta.get(key)
        if v is None:
            continue
        ok = isinstance(v, typ) and not isinstance(v, bool)
        if ok and key == "num_classes":
            ok = v > 0
        if ok and key == "kept_classes":
            ok = all(isinstance(c, int) and not isinstance(c, bool) for c in v)
        if not ok:
            raise OodensError(f"sidecar {side}: {key} is {json.dumps(v)} ({_json_type(v)}): expected {expected}")
    return meta


def _check_sidecar_path(side: Path, meta: dict, path_arch: str | None, path_dataset: str | None,
                        folder: Path) -> None:
    """A sidecar and the ``.../<Dataset>/<Arch>/<mode>/`` path it lies in must agree."""
    r = folder.resolve()
    where = f".../{r.parent.parent.name}/{r.parent.name}/{r.name}"
    if path_dataset is not None and meta.get("dataset") is not None:
        facts = find_dataset(meta["dataset"])
        if (facts.name if facts else str(meta["dataset"]).lower()) != path_dataset:
            raise OodensError(f"sidecar {side} says dataset {meta['dataset']!r} but its path {where} says "
                              f"{r.parent.parent.name!r}: expected them to agree (move the mode or fix the sidecar)")
    if path_arch is not None and meta.get("arch") is not None:
        if canonical_arch(meta["arch"]) != path_arch:
            raise OodensError(f"sidecar {side} says arch {meta['arch']!r} but its path {where} says {path_arch!r}: "
                              f"expected them to agree (move the mode or fix the sidecar)")


#: OpenOOD v1.5's benchmark names (the first part of its run folder names) -> oodens benchmark
OPENOOD_BENCHMARKS = {"cifar10": "openood-cifar10", "cifar100": "openood-cifar100",
                      "imagenet200": "openood-imagenet200", "imagenet": "openood-imagenet"}
#: OpenOOD v1.5's network names (``network.name``, the second part; scripts/eval_ood_imagenet.py's ``--arch``)
#: -> oodens architecture (openood/networks: ResNet50, ViT_B_16, Swin_T, RegNet_Y_16GF subclass torchvision's)
OPENOOD_NETWORKS = {"resnet18_32x32": "ResNet18_32x32", "resnet18_224x224": "ResNet18_224x224", "resnet50": "R50",
                    "vit-b-16": "torchvision:vit_b_16", "swin-t": "torchvision:swin_t",
                    "regnet": "torchvision:regnet_y_16gf"}


def openood_run(name: str) -> tuple[str, str] | None:
    """(benchmark, architecture) of an OpenOOD v1.5 run folder ``<benchmark>_<network>_<method>_e<E>_lr<LR>_<mark>``
    (configs/pipelines/train/baseline.yml's ``exp_name``; e.g. ``cifar10_resnet18_32x32_base_e100_lr0.1_default``,
    ``imagenet_resnet50_tvsv1_base_default``), or None when the name is not one."""
    for bench in sorted(OPENOOD_BENCHMARKS, key=len, reverse=True):
        if name.startswith(bench + "_"):
            rest = name[len(bench) + 1:]
            for net in sorted(OPENOOD_NETWORKS, key=len, reverse=True):
                if rest == net or rest.startswith(net + "_"):
                    return OPENOOD_BENCHMARKS[bench], OPENOOD_NETWORKS[net]
            return None
    return None


def _classes_of(dataset) -> str:
    """The label space a dataset name stands for (``openood-cifar10`` and ``cifar10`` share one)."""
    facts = find_dataset(dataset)
    return facts.classes_of if facts else str(dataset).lower()


def _describe(name: str, ckpt: Path, flags: ModeFlags) -> Mode:
    folder = ckpt.parent
    meta: dict = {}
    side = folder / SIDECAR
    if side.is_file():
        meta = read_sidecar(side)
    # save/<Dataset>/<Arch>/<mode>/file: what the path says, if it names a known arch and dataset
    parents = folder.resolve().parents
    path_arch = path_dataset = None
    path_facts = find_dataset(parents[1].name) if len(parents) > 1 else None
    if path_facts:
        try:
            path_arch = canonical_arch(parents[0].name)
            path_dataset = path_facts.name
        except OodensError:
            pass
    _check_sidecar_path(side, meta, path_arch, path_dataset, folder)
    if path_facts is None and parents and openood_run(parents[0].name):  # OpenOOD: <run folder>/s<k>/best.ckpt
        path_dataset, path_arch = openood_run(parents[0].name)  # a sidecar, when there is one, says more
    arch = _pick("arch", folder, ("sidecar", meta.get("arch")), ("path", path_arch),
                 ("flag", canonical_arch(flags.arch) if flags.arch else None))
    if arch is None:
        raise OodensError(
            f"cannot tell the architecture of mode {folder}: no {SIDECAR} sidecar, the path is not "
            f".../<Dataset>/<Arch>/{folder.name} nor an OpenOOD run folder <benchmark>_<network>_.../{folder.name}, "
            f"and no --arch was given"
        )
    arch = canonical_arch(arch)
    dataset = _pick("benchmark", folder, ("sidecar", meta.get("dataset")), ("path", path_dataset),
                    ("flag", flags.dataset), key=_classes_of)
    facts = find_dataset(dataset) if dataset else None  # the class count and preset a sidecar may lack
    num_classes = _pick("num-classes", folder, ("sidecar", meta.get("num_classes")),
                        ("path", facts.num_classes if facts else None), ("flag", flags.num_classes))
    preset = flags.preset or meta.get("preset") or (facts.preset if facts else None)
    if num_classes is None or preset is None or dataset is None:
        lacking = [w for w, v in (("--num-classes", num_classes), ("--preset", preset), ("--benchmark", dataset))
                   if v is None]
        raise OodensError(
            f"cannot tell the {', '.join(lacking)} of mode {folder}: expected a {SIDECAR} sidecar, a path "
            f".../<Dataset>/<Arch>/{folder.name} with Dataset one of {', '.join(DATASETS)}, or the flags"
        )
    bench = facts.name if facts else str(dataset).lower()
    return Mode(name, ckpt, arch, bench, int(num_classes), str(preset), meta)


def discover_modes(root: Path, flags: ModeFlags = ModeFlags()) -> list[Mode]:
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
    modes = [_describe(name, ckpt, flags) for name, ckpt in found]
    check_consistent(modes)
    return modes


def check_consistent(modes: list[Mode]) -> None:
    """All modes of a set share dataset, class count and preprocessing. Their architectures may differ (a
    heterogeneous ensemble, e.g. a CNN and a ViT trained on the same classes): logit strategies combine them as
    they are, ``concat`` joins features of per-member widths, and what needs equal widths says so.

    Leave-out members (ELOC; ``kept_classes`` in the sidecar) are the one relaxation: their heads
    predict different subsets of the dataset's ``num_classes`` classes, so their output widths may
    differ. A set is either all leave-out members or none, and kept classes must be distinct
    classes of the dataset."""
    first = modes[0]
    for m in modes[1:]:
        for attr in ("num_classes", "dataset", "preset"):
            if getattr(m, attr) != getattr(first, attr):
                raise OodensError(
                    f"mode {m.name} has {attr} {getattr(m, attr)!r} but mode {first.name} has "
                    f"{getattr(first, attr)!r}: all modes of a set must share {attr}"
                )
    leave_out = [m for m in modes if m.kept_classes]
    if leave_out and len(leave_out) != len(modes):
        plain = next(m for m in modes if not m.kept_classes)
        raise OodensError(
            f"mode {leave_out[0].name} is a leave-out member (kept_classes in its {SIDECAR}) but mode {plain.name} "
            f"is not: expected a set of leave-out members only, or of ordinary modes only"
        )
    for m in leave_out:
        kept = m.kept_classes
        if len(set(kept)) != len(kept) or not all(0 <= c < m.num_classes for c in kept):
            raise OodensError(f"mode {m.name}: kept_classes {kept} in its {SIDECAR} are not distinct classes of "
                              f"0..{m.num_classes - 1} (expected the sidecar oodens train --leave-out writes)")


def mode_dir(out: Path, dataset_folder: str, arch: str, seed: int) -> Path:
    """``out/<Dataset>/<Arch>/seed-<S>``, the layout ``oodens train`` writes."""
    return Path(out) / dataset_folder / arch_folder(arch) / f"seed-{seed}"
