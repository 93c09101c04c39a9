"""Scale-out across processes with ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

The commands that do per-sample work (extraction, screening, shift) cut it into fixed units
(batches, samples) and give unit ``i`` to rank ``i % world``. A unit's result depends only on
the unit (its seed is derived from its index, never from the rank), so a run on ``W``
processes gives the same results as a run on one; rank 0 gathers and writes the outputs.

Nothing here starts processes: launch the usual way, e.g.::

    torchrun --nproc-per-node 2 -m personakern screen --data train.jsonl --vectors v.safetensors
    accelerate launch -m personakern screen ...

Both set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init` joins the process
group (NCCL when each rank has a GPU, gloo otherwise). Without those variables everything runs in
one process and the functions below are no-ops.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True when started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: Optional[str] = None) -> bool:
    """Join the process group the launcher describes (idempotent). Returns True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This rank's device: its GPU when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if active() else torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T], rank_: Optional[int] = None, world: Optional[int] = None) -> List[T]:
    """Units ``rank, rank + world, ...`` of ``items`` (round robin, so sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def my_indices(n: int) -> range:
    return range(rank(), n, world_size())


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``t`` over ranks (a new tensor; ``t`` is unchanged)."""
    if not active():
        return t.clone()
    out = t.detach().clone()
    dev = out.device
    backend = dist.get_backend()
    if backend == "gloo" and dev.type != "cpu":
        out = out.cpu()
    elif backend == "nccl" and dev.type != "cuda":   # NCCL reduces only GPU tensors (shift sums on the CPU)
        out = out.to(local_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(dev)


def finish(ok: bool = True) -> None:
    """Leave the process group (call at the end of a launched command).

    ``ok=False`` (this rank is leaving with an exception) skips the closing barrier: it would
    match a barrier the other ranks wait at inside the command and let them go on as if this
    rank had finished its share; without it they get a "connection closed" error instead."""
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
