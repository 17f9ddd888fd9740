"""Which device the network runs on: ``--device auto|cpu|cuda|cuda:N``.

A runtime helper beside the data flow: extraction, training and the process group
use it; it depends on nothing of oodens but its error type.
"""

from __future__ import annotations

import torch

from oodens.errors import OodensError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OodensError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OodensError(f"--device {name}: CUDA is not available on this machine (expected auto or cpu)")
    return dev
