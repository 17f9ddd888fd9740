"""Reading and writing checkpoint files: always as data, never as code.

Layouts accepted: ``{"state_dict": ...}`` (plus any other keys), a bare state
dict (OpenOOD's ``best.ckpt``), keys with or without the ``module.`` prefix of ``nn.DataParallel``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oodens.errors import OodensError

SIDECAR = "oodens.json"
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".ckpt", ".safetensors")
#: file names that win when a mode folder holds several checkpoints (reference layouts; OpenOOD v1.5 writes
#: ``best.ckpt`` beside ``best_epoch<E>_acc<A>.ckpt`` and ``last_epoch<E>_acc<A>.ckpt``, openood/recorders)
PREFERRED_NAMES = ("epoch150.pth", "checkpoint.pth.tar", "best.ckpt")


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
        # torch may warn while reading (a legacy non-zip file, a deprecated storage type): the file either
        # loads, or fails with oodens' one line, never with warnings printed first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.name.endswith(".safetensors"):
                from safetensors.torch import load_file

                obj = load_file(str(path), device="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler of a corrupt file can raise nearly anything: all mean "unreadable"
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
        what = "safetensors.torch.save_file" if path.name.endswith(".safetensors") else "torch.save"
        raise OodensError(
            f"checkpoint {path} is truncated or unreadable ({reason}): expected a file written by {what} "
            f"holding a state dict"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OodensError(f"checkpoint {path} holds no state dict (expected {{'state_dict': {{name: tensor}}}})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """A one-line error naming the first tensor of ``state`` holding NaN or Inf values, with their count."""
    def count(v: torch.Tensor) -> int:
        # numpy for CPU float tensors: one pass, no intra-op thread barrier per tensor (torch's check waits at one
        # per tensor, which stalls for a time slice each on a busy machine: 0.8 s for an R18 under load)
        if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64, torch.float16):
            a = v.detach().numpy()
            return 0 if np.isfinite(a).all() else int((~np.isfinite(a)).sum())
        return int((~torch.isfinite(v)).sum())

    bad = [(k, count(v)) for k, v in state.items() if v.is_floating_point() or v.is_complex()]
    bad = [(k, n) for k, n in bad if n]
    if bad:
        k, n = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise OodensError(f"{what} holds non-finite weights: {n} of {state[k].numel()} values of {k} are NaN or "
                          f"Inf{more}: expected finite numbers (retrain or restore the file)")


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
    check_finite(state, f"checkpoint {path}")
    model.load_state_dict(state, strict=True)
    return model


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see half a file. On any failure
    (a full disk, a read-only folder, Ctrl-C) the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:  # never created, or already gone
            pass
        raise


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
