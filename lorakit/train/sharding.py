"""FSDP2 for `--strategy fsdp`: the model's parameters, frozen base and adapters alike, split over the
processes with `torch.distributed.fsdp.fully_shard` (one group per decoder layer, one for the rest),
and the whole adapter gathered back for every save.

Why it is built so:
- Gradients are summed, not averaged: the loop already divides each step's loss by the global
  token count (`lorakit.train.loop`), so FSDP's default mean over processes would shrink every
  update by 1/world. Hence `set_gradient_divide_factor(1)`, with sum-only collectives (gloo has no
  PREMUL_SUM).
- A save gathers only adapter tensors (`DTensor.full_tensor()` per tensor, a collective every
  process joins), never the base, and checks them against the model's adapters before anything is
  written (`check_adapter`): the empty or tiny adapter file that sharded training is known to write
  in other toolkits is an error here.
- Checkpoints hold whole tensors and the optimizer state in the 1-process layout, so a run resumes
  with any number of processes and either strategy: every process reads the file and keeps its own
  slice (`shard_like`); the data order is a function of the global batch (`loop.batch_plan`).
- bf16: a `MixedPrecisionPolicy` (bf16 parameters in compute, fp32 gradient reduction) when the loop
  computes in bf16; FSDP never casts non-float storage such as NF4 codes.
- Evaluation runs on every process in step (each forward is a collective under sharding); rank 0
  keeps the result.
- Outside `torchrun` (one process) nothing is sharded and every function here is plain copying.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import _state
from ..errors import TrainingError
from ..io import adapter_state_dict
from ..modeling import decoder_layers
from . import distributed as dist

log = logging.getLogger(__name__)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (its forward is then a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, device: torch.device, bf16: bool = False) -> nn.Module:
    """Shard `model` in place over the process group: each decoder layer (`modeling.decoder_layers`),
    then the root (embeddings, final norm, head). Trainable parameters are first broadcast from
    rank 0, so every process cuts its shard from the same start. With one process nothing changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.active():
        log.info("--strategy fsdp with one process: nothing to shard; training unsharded")
        return model
    dist.broadcast_params(p for p in model.parameters() if p.requires_grad)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, "mp_policy": policy or MixedPrecisionPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a sharded tensor gathered from every process (a collective), any other as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors` (sharded ones gathered: every process must call it)."""
    with torch.no_grad():
        return {k: full_tensor(v.detach()).cpu().contiguous().clone() for k, v in tensors.items()}


def gather_state(obj: Any) -> Any:
    """`obj` (an optimizer state dict, nested dicts and lists) with every sharded tensor made whole,
    on CPU; the rest as it is. A collective under sharding."""
    if isinstance(obj, DTensor):
        with torch.no_grad():
            return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: gather_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_state(v) for v in obj)
    return obj


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (whole, the same on every process) as `like` holds it: this process's slice when
    `like` is sharded, else `value` itself."""
    if not isinstance(like, DTensor):
        return value
    # every process read the same file: each keeps its slice, no communication (src_data_rank=None)
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state dict (`gather_state`'s, or a 1-process run's) with each parameter's
    moment tensors cut like that parameter, ready for `optimizer.load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    ids = [i for group in state["param_groups"] for i in group["params"]]
    owner = dict(zip(ids, params))
    cut = {
        i: {
            k: shard_like(v, owner[i])
            if isinstance(v, torch.Tensor) and i in owner and v.shape == owner[i].shape
            else v
            for k, v in values.items()
        }
        for i, values in state["state"].items()
    }
    return {**state, "state": cut}


def full_adapters(model: nn.Module) -> dict[str, dict[str, torch.Tensor]] | None:
    """Every adapter's tensors under PEFT's names, whole and checked (`check_adapter`), on the main
    process; None on the others. Under sharding every process must call it; only adapter tensors
    are gathered, never the base. Raises `TrainingError` when the gathered tensors are wrong."""
    gathered = {name: gather(adapter_state_dict(model, name)) for name in _state.names(model)}
    if not dist.is_main():
        return None
    check_adapter(gathered, model)
    return gathered


def check_adapter(gathered: dict[str, dict[str, torch.Tensor]], model: nn.Module) -> None:
    """Refuse adapter tensors that are not `model`'s adapters: an adapter or tensor missing or extra,
    a shape other than the model's, or an empty tensor (what a gather of shards gone wrong gives).
    Raises `TrainingError` naming them; returns None when all is well."""
    problems = [
        f"adapter {n!r} is not on the model" for n in sorted(set(gathered) - set(_state.names(model)))
    ]
    for name in _state.names(model):
        expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model, name).items()}
        got = gathered.get(name)
        if got is None:
            problems.append(f"adapter {name!r} is missing")
            continue
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        empty = [k for k, t in got.items() if t.numel() == 0]
        shapes = [
            f"{k} {list(got[k].shape)} (model: {list(s)})"
            for k, s in expected.items()
            if k in got and tuple(got[k].shape) != s and k not in empty
        ]
        for what, keys in (("missing", missing), ("unexpected", extra), ("empty", empty), ("shape", shapes)):
            if keys:
                problems.append(f"adapter {name!r}: {what} ({len(keys)}): {', '.join(keys[:4])}")
    if problems:
        raise TrainingError(
            "refusing to save an adapter that does not match the model's adapters: "
            + "; ".join(problems)
            + ". Nothing was written; the newest checkpoint is the last good state. The shards were "
            "not gathered whole (lorakit.train.sharding): please report this with the launch command"
        )
