"""torchrun/DDP plumbing: which rank we are, and agreeing across ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from training.errors import TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> Dist:
    """Join the process group that torchrun describes in the environment (env://), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def agree(d: Dist, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then agree: if it failed on any rank, every rank raises that
    failure's one-line reason, so no rank is left waiting in a collective for a dead peer.

    ``fn`` must not itself use collectives."""
    value: Any = None
    error: str | None = None
    failure: BaseException | None = None
    try:
        value = fn()
    except Exception as e:  # any failure on this rank is reported on all of them
        failure = e
        error = str(e) if isinstance(e, TrainingError) else f"{type(e).__name__}: {e}"
    if not d.enabled:
        if failure is not None:
            raise failure
        return value
    errors: list[str | None] = [None] * d.world
    dist.all_gather_object(errors, error)
    if failure is not None:
        raise failure
    for rank, e in enumerate(errors):
        if e is not None:
            raise TrainingError(f"rank {rank} failed: {e}")
    return value


def broadcast_object(d: Dist, value: T) -> T:
    """Rank 0's value on every rank."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, value)
    return out


def any_ranks(d: Dist, flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank if any rank says True (so all ranks act at one step)."""
    if not d.enabled:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]
