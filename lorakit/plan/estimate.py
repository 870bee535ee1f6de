"""`estimate(setup)`: parameters, file sizes and training memory of one setup, from the model's
shape alone (built on `meta`, LoRA applied by lorakit's own `inject`, activations traced).

`compare(setup)` gives the same for full fine-tuning, LoRA and QLoRA side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..hf import DEFAULT_MODEL
from ..modeling import decoder_layers, full_heads
from ..quant import DEFAULT_BLOCKSIZE, nf4_bytes, quantized_weights
from ..tasks import TASKS
from .memory import CPU_RUNTIME_BYTES, OPTIMIZERS, StepMemory, optimizer_state_bytes, step_memory
from .models import ATTENTION, build_meta_model, load_config
from .trace import ActivationTrace, trace_activations

# the tasks whose models plan builds: every task `lorakit train` runs
PLAN_TASKS = tuple(TASKS)

METHODS = ("full", "lora", "qlora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanSetup:
    """One training setup to estimate. `dtype` is the base weights' (and activations') dtype;
    LoRA adapters train in fp32 as lorakit keeps them. `device` picks the optimizer update's
    implementation ("cuda": multi-tensor, "cpu": per-parameter loop)."""

    model: str = DEFAULT_MODEL
    method: str = "lora"
    r: int = 8
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] | str = "all-linear"
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "cuda"
    task: str = "causal-lm"
    adapter_dtype: str | None = None  # dtype the adapter file is saved in; None: as trained (fp32)
    target_parameters: tuple[str, ...] = ()  # parameters to adapt (MoE experts), PEFT's rule
    use_dora: bool = False  # DoRA: + one magnitude per output feature, and its forward's activations
    fsdp: int = 1  # processes the model is sharded over (`lorakit train --fsdp`); memory is per process
    new_tokens: int = 0  # tokens added (`lorakit train --add-tokens`): embeddings resized, their rows trained

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.adapter_dtype is not None:
            object.__setattr__(
                self, "adapter_dtype", _DTYPE_ALIASES.get(self.adapter_dtype, self.adapter_dtype)
            )
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "target_parameters", tuple(self.target_parameters or ()))
        checks = [
            ("method", self.method, METHODS),
            ("dtype", self.dtype, tuple(DTYPES)),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("attention", self.attention, ATTENTION),
            ("device", self.device, DEVICES),
            ("task", self.task, PLAN_TASKS),
        ]
        if self.adapter_dtype is not None:
            checks.append(("adapter_dtype", self.adapter_dtype, tuple(DTYPES)))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"plan: {name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("r", "batch_size", "seq_len", "fsdp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"plan: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.new_tokens, int) or isinstance(self.new_tokens, bool) or self.new_tokens < 0:
            raise ConfigError(f"plan: new_tokens must be an integer >= 0, got {self.new_tokens!r}")

    def lora_config(self) -> LoraConfig:
        """The `LoraConfig` this setup applies."""
        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.r if self.lora_alpha is None else self.lora_alpha,
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            target_parameters=list(self.target_parameters) or None,
            use_dora=self.use_dora,
        )


@dataclass
class Estimate:
    """What `estimate` reports. Byte counts are exact for weights, gradients, optimizer state and
    files; activations come from tracing the forward pass; `memory.peak` from `step_memory`."""

    setup: PlanSetup
    total_params: int
    trainable_params: int
    weights_by_dtype: dict[str, int]
    checkpoint_bytes: int  # the whole model saved in `setup.dtype` (what full fine-tuning writes)
    adapter_bytes: int | None  # the adapter file (LoRA / QLoRA), safetensors header included
    memory: StepMemory | None  # None when estimated with memory=False
    targets: list[str] = field(default_factory=list, repr=False)

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        setup = dataclasses.asdict(self.setup)
        for key in ("target_modules", "target_parameters"):
            if isinstance(setup[key], tuple):
                setup[key] = list(setup[key])
        return {
            "setup": setup,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_ratio": self.trainable_ratio,
            "num_targets": len(self.targets),
            "weights_by_dtype": self.weights_by_dtype,
            "checkpoint_bytes": self.checkpoint_bytes,
            "adapter_bytes": self.adapter_bytes,
            "memory": dataclasses.asdict(self.memory) if self.memory else None,
        }


@lru_cache(maxsize=4)
def _base_model(model: str, dtype: str, attention: str, task: str) -> nn.Module:
    config = load_config(model)
    return build_meta_model(config, task, attention).to(DTYPES[dtype])


def _structure(setup: PlanSetup) -> PlanSetup:
    """`setup` reduced to what decides the prepared model's structure (LoRA and QLoRA build the
    same meta model: NF4 storage is accounted for by `estimate`, not built)."""
    key = dataclasses.replace(
        setup,
        method="lora" if setup.method == "qlora" else setup.method,
        batch_size=1,
        seq_len=1,
        gradient_checkpointing=False,
        optimizer="adamw",
        device="cuda",
        adapter_dtype=None,
        lora_alpha=None,
    )
    return dataclasses.replace(key, r=1, target_modules="all-linear") if key.method == "full" else key


@lru_cache(maxsize=8)
def _prepared(key: PlanSetup) -> tuple[nn.Module, tuple[str, ...]]:
    """A meta copy of the model with the method applied (LoRA injected); cached, never modified
    afterwards (tracing only runs forward passes)."""
    from ..inject import find_parameter_targets, find_targets, inject, resolve_all_linear

    model = copy.deepcopy(_base_model(key.model, key.dtype, key.attention, key.task))
    rows = _add_token_rows(model, key.new_tokens)
    if key.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, ()
    config = resolve_all_linear(model, key.lora_config())
    # what `lorakit train` trains besides LoRA: a classifier's or tagger's new head in full, new rows
    heads = full_heads(model, key.task)
    config = dataclasses.replace(config, modules_to_save=heads or None, trainable_token_indices=rows or None)
    with torch.device("meta"):
        targets = find_targets(model, config)
        targets += [f"{m}.{p}" for m, p in find_parameter_targets(model, config, targets)]
        inject(model, config)
    return model, tuple(targets)


def _add_token_rows(model: nn.Module, n: int) -> list[int]:
    """Grow the embeddings (and an untied head) by `n` rows, as `lorakit train --add-tokens` does;
    the new rows' ids."""
    if not n:
        return []
    old = model.get_input_embeddings().weight.shape[0]
    with torch.device("meta"):
        model.resize_token_embeddings(old + n, mean_resizing=False)
    return list(range(old, old + n))


@lru_cache(maxsize=64)
def _trace(key: PlanSetup, batch_size: int, seq_len: int) -> ActivationTrace:
    return trace_activations(_prepared(key)[0], batch_size, seq_len)


def activation_trace(setup: PlanSetup) -> ActivationTrace:
    """The activation trace of `setup`, cached: gradient checkpointing does not change it (it
    changes what `step_memory` keeps), LoRA and QLoRA keep the same tensors, and full fine-tuning's
    does not depend on LoRA settings."""
    return _trace(_structure(setup), setup.batch_size, setup.seq_len)


def _quantized_weights(model: nn.Module) -> set[int]:
    """ids of the weights QLoRA stores in NF4, by lorakit.quant's own rule (`quantized_weights`)."""
    return {id(model.get_submodule(name).weight) for name in quantized_weights(model)}


def estimate(setup: PlanSetup, *, memory: bool = True) -> Estimate:
    """Estimate `setup`: parameter counts, weights by dtype, checkpoint and adapter file sizes,
    and (unless `memory` is False, which skips the activation trace) the memory of one training
    step (see `lorakit.plan.memory`).

    Raises `ConfigError` for an invalid setup or an unreadable model, `TargetNotFoundError` when
    the target modules match nothing in the model.
    """
    model, targets = _prepared(_structure(setup))
    quantized = _quantized_weights(model) if setup.method == "qlora" else set()
    by_dtype: dict[str, int] = {}
    total = trainable = trainable_bytes = largest = 0
    dequant = 0
    stored: dict[int, int] = {}
    scales: dict[int, int] = {}  # NF4 block scales: buffers, whole on every process under FSDP
    for p in model.parameters():
        n, size = p.numel(), p.numel() * p.element_size()
        total += n
        if id(p) in quantized:
            key, size = "nf4 (with scales)", nf4_bytes(n, DEFAULT_BLOCKSIZE)
            scales[id(p)] = size - (n + 1) // 2
            dequant = max(dequant, n * p.element_size())
        else:
            key = str(p.dtype).removeprefix("torch.")
            if p.requires_grad and setup.method != "full":
                key += " (adapters)"
        by_dtype[key] = by_dtype.get(key, 0) + size
        stored[id(p)] = size
        if p.requires_grad:
            trainable += n
            trainable_bytes += p.numel() * p.element_size()
            largest = max(largest, p.numel() * p.element_size())
    layer_grads = [
        sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
        for layer in decoder_layers(model)
    ]
    step = None
    if memory:
        n = setup.fsdp  # FSDP2 keeps 1/n of every gradient and optimizer moment per process
        step = step_memory(
            weights=fsdp_weights(model, stored, scales, n),
            layer_grads=[-(-g // n) for g in layer_grads],
            other_grads=-(-(trainable_bytes - sum(layer_grads)) // n),
            optimizer=-(-optimizer_state_bytes(setup.optimizer, trainable, trainable_bytes) // n),
            largest_trainable=-(-largest // n),
            trace=activation_trace(setup),
            gradient_checkpointing=setup.gradient_checkpointing,
            logits_upcast=setup.dtype != "float32",
            dequant_workspace=dequant,
            device=setup.device,
            runtime=CPU_RUNTIME_BYTES if setup.device == "cpu" else 0,
        )
    return Estimate(
        setup=setup,
        total_params=total,
        trainable_params=trainable,
        weights_by_dtype=by_dtype,
        checkpoint_bytes=total * DTYPES[setup.dtype].itemsize,
        adapter_bytes=None if setup.method == "full" else _adapter_file_bytes(model, setup.adapter_dtype),
        memory=step,
        targets=list(targets),
    )


def fsdp_weights(model: nn.Module, stored: dict[int, int], whole: dict[int, int], n: int) -> int:
    """Weight bytes one process holds when the model is sharded n ways as `lorakit train --fsdp`
    shards it (FSDP2 per decoder layer and the root): 1/n of every parameter's `stored[id]` bytes,
    plus what is gathered whole for compute: the root group (embeddings, final norm, head: FSDP2 keeps
    it gathered from the forward to the backward) and two decoder layers (the one computing and the
    next, prefetched). `whole[id]` bytes of a parameter are not sharded (NF4 block scales: `Linear4bit`
    keeps them in buffers, which FSDP2 does not shard; its packed codes are a parameter and shard).
    n = 1: the plain sum."""
    total = sum(stored.values())
    if n == 1:
        return total
    kept = sum(whole.values())
    layers = [
        sum(stored[id(p)] - whole.get(id(p), 0) for p in layer.parameters())
        for layer in decoder_layers(model)
    ]
    shardable = total - kept
    gathered = (shardable - sum(layers)) + sum(sorted(layers)[-2:])
    return kept + -(-shardable // n) + gathered * (n - 1) // n


def _adapter_file_bytes(model: nn.Module, dtype: str | None) -> int:
    """Size of `adapter_model.safetensors`: tensor data plus safetensors' JSON header."""
    from ..io import adapter_state_dict

    tensors = adapter_state_dict(model, "default")
    header, offset = {}, 0
    for name, t in tensors.items():
        torch_dtype = DTYPES[dtype] if dtype else t.dtype
        end = offset + t.numel() * torch_dtype.itemsize
        tag = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(torch_dtype, "F32")
        header[name] = {"dtype": tag, "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def compare(setup: PlanSetup) -> dict[str, Estimate]:
    """`estimate` for full fine-tuning, LoRA and QLoRA with the same other settings."""
    return {m: estimate(dataclasses.replace(setup, method=m)) for m in METHODS}
