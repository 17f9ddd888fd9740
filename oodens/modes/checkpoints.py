"""Reading and writing checkpoint files: always as data, never as code.

Layouts accepted: ``{"state_dict": ...}`` (plus any other keys), a bare state
dict, keys with or without the ``module.`` prefix of ``nn.DataParallel``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from oodens.errors import OodensError

SIDECAR = "oodens.json"
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".safetensors")
#: file names that win when a mode folder holds several checkpoints (reference layouts)
PREFERRED_NAMES = ("epoch150.pth", "checkpoint.pth.tar")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU, ``module.`` prefix removed."""
    path = Path(path)
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler of a corrupt file can raise nearly anything: all mean "unreadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OodensError(
            f"cannot read checkpoint {path}: {reason[:200]} (expected a torch.save file holding a state dict)"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OodensError(f"checkpoint {path} holds no state dict (expected {{'state_dict': {{name: tensor}}}})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: Path, arch: str) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; a mismatch is a user error naming the keys."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        for k in wrong[:3]:
            parts.append(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
        raise OodensError(f"checkpoint {path} does not fit architecture {arch!r}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module, sidecar: dict, prefix: str = "") -> None:
    """Write ``{"state_dict": ...}`` and the JSON sidecar beside it, both atomically.

    ``prefix="module."`` writes the keys as ``nn.DataParallel`` does (the ImageNet reference layout)."""
    import io

    buf = io.BytesIO()
    state = model.state_dict()
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
    torch.save({"state_dict": state}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    atomic_write_bytes(Path(path).parent / SIDECAR, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
