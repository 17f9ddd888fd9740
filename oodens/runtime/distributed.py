"""Multi-process training under ``torchrun``: one process per GPU (or CPU process), one or more nodes.

``torchrun --nproc_per_node N [--nnodes M ...] -m oodens train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`process_group` reads them and joins the process group (NCCL on GPUs, gloo on
the CPU). Without them (a plain ``oodens train``) everything runs in one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from oodens.runtime.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistContext":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[DistContext, torch.device]]:
    """(this process's rank context, its device); joins and leaves the process group when under torchrun.

    Each process drives ``cuda:LOCAL_RANK`` when CUDA is used (``--device auto`` with a GPU, or cuda)."""
    ctx = DistContext.from_env()
    dev = resolve_device(device)
    if not ctx.enabled:
        yield ctx, dev
        return
    if dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield ctx, dev
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum of ``values`` over all processes (the values themselves when not distributed)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
