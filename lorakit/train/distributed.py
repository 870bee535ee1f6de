"""Data-parallel training through `torch.distributed`, started by `torchrun`.

Each process computes gradients on its slice of every global batch; `all_reduce_grads` sums them
(the loss is already divided by the global token count), so every process takes the same optimizer
step and the adapter stays identical everywhere. Only rank 0 writes files and logs. `--strategy fsdp` shards the model instead
(`lorakit.train.sharding`); these functions then leave its sharded parameters to FSDP. Outside
`torchrun` (no `WORLD_SIZE` in the environment) every function here is a no-op for one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Joins the process group when started by torchrun: gloo on CPU,
    nccl on CUDA (each process on the GPU of its LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def active() -> bool:
    """Whether more than one process trains."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return not active() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over processes in place; returns it."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over processes, as one flat buffer (one collective call)."""
    if not active():
        return
    # a sharded (FSDP2) parameter's gradient was already summed into its shard by FSDP
    params = [p for p in params if not isinstance(p, DTensor)]
    for p in params:  # a parameter unused on one process must still join the same buffer layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_params(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every process (same start, whatever each seeded)."""
    if active():
        for p in params:
            if not isinstance(p, DTensor):  # shards are cut from a broadcast start (sharding.shard_model)
                dist.broadcast(p.data, src=0)


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
