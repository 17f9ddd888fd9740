"""Shared-backbone mode sets: N linear heads on one frozen backbone (SED), discovered as N members.

A heads folder (what ``oodens train-heads`` writes)::

    DIR/heads.json              the sidecar (below)
    DIR/heads.safetensors       weight (N, C, D) and bias (N, C), float32 (safetensors: no pickle)
    DIR/backbone/<checkpoint>   the frozen backbone (with its oodens.json), or no backbone but
                                "features" in the sidecar naming a folder of precomputed features

``heads.json``::

    {"format": "oodens-heads", "version": 1,
     "dataset": "digits", "num_classes": 6, "feature_dim": 64, "preset": "digits", "arch": "cnn",
     "feature_layer": "penultimate",                      # the backbone's penultimate features (Views.features)
     "backbone": {"checkpoint": "backbone/checkpoint.pth.tar", "sha256": "...", "arch": "cnn", ...} | null,
     "features": null | "path/to/features",               # relative to DIR or absolute
     "heads": [{"name": "head-00", "seed": 1000, "objective": {"diversity": "a2d", "lambda": 0.5, ...}}, ...],
     "training": {...}}

Precomputed features (the form SED distributes its cached DeiT features in; also what ``oodens extract
--export DIR`` writes under ``DIR/<mode>/``): one folder per dataset split, located by the benchmark's source
name and split, ``FEATURES/<dataset>/<split>/features.npy`` + ``labels.npy`` (``allow_pickle=False``), or an HDF5
file ``FEATURES/<dataset>/<split>.h5`` (``.hdf5``) with datasets ``features`` and ``labels`` (needs ``h5py``).

Evaluation never runs a network per head: the backbone is extracted as one ordinary mode (one pass per image
whatever N, cached by its checkpoint's sha256 like any mode), and each head member's views are derived from the
backbone's features ``h``: logits ``h W_iᵀ + b_i``, features ``h``, weight/bias the head's (:meth:`HeadBank.views`).
The ``soup`` (the heads' averaged weights and biases, one linear head) is derived the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodens.data.datasets import find_dataset
from oodens.errors import OodensError
from oodens.modes.discovery import Mode, ModeFlags, discover_modes
from oodens.runtime.paths import safe_name
from oodens.views.types import Views

HEADS_FILE = "heads.safetensors"
HEADS_SIDECAR = "heads.json"
FORMAT = "oodens-heads"
VERSION = 1
#: the extraction key of a heads folder's backbone, and of its precomputed features
BACKBONE, FEATURES = "backbone", "features"


def is_head_folder(path: str | Path) -> bool:
    """Whether ``path`` is a heads folder (it holds ``heads.json``)."""
    return (Path(path) / HEADS_SIDECAR).is_file()


# --------------------------------------------------------------------------- precomputed features


def feature_paths(root: Path, name: str, split: str) -> list[Path]:
    """Where a split's precomputed features may lie, in the order they are looked for."""
    base = Path(root) / safe_name(name)
    return [base / split / "features.npy", base / f"{split}.h5", base / f"{split}.hdf5"]


def read_features(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, D) float32, labels (n,) int64) of one dataset split from a precomputed-features folder."""
    paths = feature_paths(root, name, split)
    npy, *h5 = paths
    if npy.is_file():
        lab = npy.with_name("labels.npy")
        if not lab.is_file():
            raise OodensError(f"precomputed features {npy} have no {lab.name} beside them: expected labels.npy "
                              "(n,) with the features")
        try:
            feats = np.load(npy, mmap_mode="r", allow_pickle=False)
            labels = np.load(lab, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise OodensError(f"cannot read precomputed features {npy}: {e} (expected .npy arrays, no pickle)") from e
        return _checked(npy, feats, labels)
    for p in h5:
        if p.is_file():
            try:
                import h5py
            except ImportError:
                raise OodensError(f"reading {p} needs h5py: pip install h5py (or store the split as "
                                  f"{npy.parent}/features.npy + labels.npy)") from None
            try:
                with h5py.File(p, "r") as f:
                    missing = [k for k in ("features", "labels") if k not in f]
                    if missing:
                        raise OodensError(f"HDF5 file {p} has no dataset {missing[0]!r}: expected datasets "
                                          "'features' (n, D) and 'labels' (n,)")
                    feats, labels = np.asarray(f["features"]), np.asarray(f["labels"])
            except OSError as e:
                raise OodensError(f"cannot read HDF5 file {p}: {e}") from e
            return _checked(p, feats, labels)
    raise OodensError(f"no precomputed features of {name}/{split} under {root}: expected "
                      f"{paths[0]} (+ labels.npy) or {paths[1]}")


def _checked(path: Path, feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if feats.ndim != 2 or labels.ndim != 1 or len(labels) != len(feats):
        raise OodensError(f"precomputed features {path}: features {feats.shape} and labels {labels.shape}: expected "
                          "features (n, D) and labels (n,) of the same n")
    if not np.issubdtype(labels.dtype, np.integer):
        raise OodensError(f"precomputed labels of {path} are {labels.dtype}: expected integers")
    return np.asarray(feats, dtype=np.float32), labels.astype(np.int64)


@dataclass
class FeatureExtraction:
    """Precomputed features as an extraction (:class:`oodens.views.extract.Extraction`'s interface): no network
    runs; ``get(FEATURES, source)`` reads the source's split from the folder (once)."""

    root: Path
    views: dict[str, dict[tuple[str, str], Views]] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0

    def get(self, mode: str, source) -> Views:
        key = (source.name, source.split)
        by = self.views.setdefault(mode, {})
        if key not in by:
            feats, labels = read_features(self.root, *key)
            by[key] = Views(features=feats, labels=labels)
            self.cached += 1
        return by[key]


# --------------------------------------------------------------------------- the heads


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OodensError(f"cannot read heads sidecar {path}: {e} (expected the JSON oodens train-heads writes)") \
            from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OodensError(f"{path} is not a heads sidecar: expected a JSON object with \"format\": \"{FORMAT}\"")
    return meta


def read_heads_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(weight (N, C, D), bias (N, C)) float32 from a safetensors heads file, shapes checked."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise OodensError(f"heads file {path} is missing: expected {HEADS_FILE} (weight N x C x D, bias N x C) "
                          f"beside {HEADS_SIDECAR}")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise OodensError(f"cannot read heads file {path}: {str(e)[:200]} (expected safetensors with weight and "
                          "bias)") from e
    if "weight" not in t or "bias" not in t:
        raise OodensError(f"heads file {path} holds {', '.join(sorted(t)) or 'nothing'}: expected tensors 'weight' "
                          "(N, C, D) and 'bias' (N, C)")
    w, b = t["weight"], t["bias"]
    if w.ndim != 3 or b.shape != w.shape[:2]:
        raise OodensError(f"heads file {path}: weight {tuple(w.shape)} and bias {tuple(b.shape)}: expected weight "
                          "(N, C, D) and bias (N, C)")
    bad = int(w.size + b.size - np.count_nonzero(np.isfinite(w)) - np.count_nonzero(np.isfinite(b)))
    if bad:
        raise OodensError(f"heads file {path}: {bad} weights are NaN or infinite (expected finite heads)")
    return np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def save_heads(out: Path, weight: np.ndarray, bias: np.ndarray, sidecar: dict) -> None:
    """Write ``out/heads.safetensors`` and ``out/heads.json`` atomically (the heads file first)."""
    from safetensors.numpy import save

    from oodens.modes.checkpoints import atomic_write_bytes

    data = save({"weight": np.ascontiguousarray(weight, dtype=np.float32),
                 "bias": np.ascontiguousarray(bias, dtype=np.float32)})
    atomic_write_bytes(Path(out) / HEADS_FILE, data)
    atomic_write_bytes(Path(out) / HEADS_SIDECAR, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())


@dataclass
class HeadBank:
    """N linear heads on one backbone (or on precomputed features): ``weight`` (N, C, D), ``bias`` (N, C);
    ``members`` are the N :class:`Mode` s a mode set lists (``head-00``...); ``backbone`` is the backbone mode
    extraction runs (None with precomputed ``features``)."""

    path: Path
    weight: np.ndarray
    bias: np.ndarray
    sidecar: dict
    members: list[Mode]
    backbone: Mode | None = None
    features: Path | None = None

    @property
    def key(self) -> str:
        """The extraction key of the backbone's views (a mode name, or :data:`FEATURES`)."""
        return self.backbone.name if self.backbone is not None else FEATURES

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def extraction_modes(self) -> list[Mode]:
        """The modes extraction runs: the backbone alone (one pass per image whatever N)."""
        return [self.backbone] if self.backbone is not None else []

    def head(self, i: int | str) -> tuple[np.ndarray, np.ndarray]:
        """Head i's (weight (C, D), bias (C,)); ``"soup"``: the heads' averaged weights and biases."""
        if i == "soup":
            return self.weight.mean(axis=0, dtype=np.float64).astype(np.float32), \
                self.bias.mean(axis=0, dtype=np.float64).astype(np.float32)
        if isinstance(i, str):
            i = self.names.index(i)
        return self.weight[i], self.bias[i]

    def views(self, i: int | str, base: Views) -> Views:
        """Head i's (or the soup's) views from the backbone's views: logits = h Wᵀ + b (float32), features h,
        labels, weight/bias the head's; the backbone's extra views that do not depend on its head (layers, gram)
        are shared."""
        w, b = self.head(i)
        h = np.asarray(base.features, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != w.shape[1]:
            raise OodensError(f"heads in {self.path} take {w.shape[1]}-d features but the backbone gives features of "
                              f"shape {h.shape}: expected the feature layer the heads were trained on")
        return Views(logits=h @ w.T + b, features=base.features, labels=base.labels, weight=w, bias=b,
                     extra=dict(base.extra))


def _head_sha(w: np.ndarray, b: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
    return h.hexdigest()


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def load_heads(root: str | Path, flags: ModeFlags = ModeFlags()) -> HeadBank:
    """The heads folder ``root`` as a :class:`HeadBank`, every part checked (one-line errors naming the file)."""
    root = Path(root)
    side = root / HEADS_SIDECAR
    meta = _read_json(side)
    weight, bias = read_heads_file(root / meta.get("heads_file", HEADS_FILE))
    n, c, d = weight.shape
    entries = meta.get("heads") or [{} for _ in range(n)]
    if not isinstance(entries, list) or len(entries) != n:
        raise OodensError(f"{side} lists {len(entries) if isinstance(entries, list) else 'no'} heads but "
                          f"{HEADS_FILE} holds {n}: expected one entry per head")
    backbone = features = None
    bb = meta.get("backbone")
    if bb:
        ckpt = _resolve(root, bb["checkpoint"] if isinstance(bb, dict) else bb)
        if not ckpt.is_file():
            raise OodensError(f"backbone checkpoint {ckpt} named by {side} is missing: expected the backbone file "
                              "the heads were trained on")
        found = [m for m in discover_modes(ckpt.parent, flags) if m.checkpoint.resolve() == ckpt.resolve()]
        if not found:
            raise OodensError(f"backbone {ckpt} is not a mode oodens can read (expected a checkpoint with its "
                              "oodens.json)")
        backbone = found[0]
        backbone.name = BACKBONE
        want = bb.get("sha256") if isinstance(bb, dict) else None
        if want and backbone.sha256 != want:
            raise OodensError(f"backbone {ckpt} has sha256 {backbone.sha256[:12]}... but {side} says {want[:12]}...: "
                              "expected the backbone the heads were trained on")
    elif meta.get("features"):
        features = _resolve(root, meta["features"])
        if not features.is_dir():
            raise OodensError(f"precomputed features folder {features} named by {side} is missing: expected "
                              "<dataset>/<split>/features.npy + labels.npy (or <split>.h5) under it")
    else:
        raise OodensError(f"{side} names neither a backbone nor precomputed features: expected \"backbone\": "
                          "{\"checkpoint\": ...} or \"features\": \"DIR\"")
    dataset = meta.get("dataset") or (backbone.dataset if backbone else None) or flags.dataset
    facts = find_dataset(dataset) if dataset else None
    num_classes = int(meta.get("num_classes") or (backbone.num_classes if backbone else c))
    if num_classes != c:
        raise OodensError(f"{side} says {num_classes} classes but the heads have {c} outputs: expected them to agree")
    if flags.num_classes is not None and flags.num_classes != c:
        raise OodensError(f"--num-classes {flags.num_classes} contradicts the heads in {root} ({c} classes): "
                          "expected them to agree, or drop the flag")
    if dataset is None:
        raise OodensError(f"cannot tell the dataset of the heads in {root}: expected \"dataset\" in {side} or "
                          "--benchmark")
    arch = meta.get("arch") or (backbone.arch if backbone else FEATURES)
    preset = flags.preset or meta.get("preset") or (backbone.preset if backbone else None) or \
        (facts.preset if facts else FEATURES)
    if backbone is not None and flags.preset:
        backbone.preset = flags.preset
    bench = facts.name if facts else str(dataset).lower()
    members = []
    for i, e in enumerate(entries):
        e = e if isinstance(e, dict) else {}
        name = str(e.get("name") or f"head-{i:0{max(2, len(str(n - 1)))}d}")
        m = Mode(name, root / meta.get("heads_file", HEADS_FILE), arch, bench, num_classes, preset,
                 {**e, "head": i, "backbone": bb if isinstance(bb, dict) else None,
                  "feature_layer": meta.get("feature_layer", "penultimate")})
        m.__dict__["sha256"] = _head_sha(weight[i], bias[i])  # the member is this head: its own identity
        members.append(m)
    if len({m.name for m in members}) != n:
        raise OodensError(f"{side}: head names repeat: expected distinct names")
    return HeadBank(root, weight, bias, meta, members, backbone, features)
