"""The arithmetic of training memory: pure functions on byte counts, no model needed.

Peak memory is simulated over one steady-state training step (from the second step on, so the
optimizer state exists; gradients set to None before the forward, as `zero_grad()` does):

- end of forward: weights + optimizer state + everything kept for backward + the logits (and, for a
  model not in fp32, the loss's fp32 copy of them);
- start of backward: the loss's two [tokens, vocab] fp32 gradients on top of what is kept, or
  the output head's weight gradient once they are freed;
- each decoder layer's backward, last to first: what earlier layers keep + the gradients produced
  so far + this layer's backward workspace (with gradient checkpointing: the layer inputs + this
  layer's recomputed activations);
- optimizer step: weights + gradients + optimizer state + the update's temporaries (CUDA's
  multi-tensor AdamW makes one copy of all trainable parameters; the CPU loop, two of the largest).
"""

from __future__ import annotations

from dataclasses import dataclass

from .trace import ActivationTrace

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# What PyTorch's CPU runtime itself adds while training (thread pools, the autograd engine, allocator
# arenas): peak RSS over baseline minus predicted tensors, measured with a 2-layer 64-wide Llama
# (2 threads) where the tensors are negligible: 51 MiB. A GPU's CUDA context (outside PyTorch's
# allocator statistics) is not included: it was not measured here.
CPU_RUNTIME_BYTES = 51 * 2**20


def optimizer_state_bytes(optimizer: str, trainable_numel: int, trainable_bytes: int) -> int:
    """Optimizer state for the trainable parameters: AdamW keeps two moments in the parameters'
    dtype; 8-bit AdamW (bitsandbytes) two 1-byte moments plus an fp32 scale per 256 values; SGD
    without momentum keeps nothing. Raises `ValueError` for another optimizer name."""
    if optimizer == "adamw":
        return 2 * trainable_bytes
    if optimizer == "adamw8bit":
        return 2 * trainable_numel + 2 * 4 * -(-trainable_numel // 256)
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


@dataclass
class StepMemory:
    """Bytes by category and the predicted peak of one training step."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # kept for backward at the end of the forward (with checkpointing: layer inputs)
    # transients at the peak beyond the four above (loss gradients, a layer's recompute, the
    # update); 0 when the peak is below their sum (full fine-tuning: the gradients grow as the
    # activations are freed, so the two never coexist in full)
    workspace: int
    peak: int
    peak_phase: str  # where the peak happens: "forward", "backward", "optimizer step"
    runtime: int = 0  # the framework's own memory (CPU_RUNTIME_BYTES on CPU), included in `peak`


def step_memory(
    *,
    weights: int,
    layer_grads: list[int],
    other_grads: int,
    optimizer: int,
    largest_trainable: int,
    trace: ActivationTrace,
    gradient_checkpointing: bool,
    logits_upcast: bool,
    dequant_workspace: int = 0,
    device: str = "cuda",
    runtime: int = 0,
) -> StepMemory:
    """Simulate the steady-state step described in the module docstring and return its peak.

    `layer_grads[i]`: gradient bytes of decoder layer i's trainable parameters; `other_grads`: those
    outside the layers (head, embeddings). `dequant_workspace`: one full-precision weight that a
    4-bit layer dequantizes for its matmul. `device` "cuda" or "cpu" selects the optimizer's
    implementation (multi-tensor on CUDA, a per-parameter loop on CPU). `runtime`: the
    framework's own memory, added to the peak.
    """
    grads = sum(layer_grads) + other_grads
    static = weights + optimizer
    n = len(trace.layers)
    if gradient_checkpointing:
        kept_layers = [trace.layer_input] * n
    else:
        kept_layers = list(trace.layers)
    kept = trace.before + sum(kept_layers) + trace.after
    upcast = trace.loss_grad if logits_upcast else 0
    phases = {"forward": static + kept + trace.logits + upcast + dequant_workspace}
    # the loss backward holds d(log-probs) and d(logits) in fp32 (plus the cast of the latter to
    # the model's dtype); then the saved log-probs and d(log-probs) are freed while the head's
    # weight gradient is made: the two never coexist
    loss_bwd = 2 * trace.loss_grad + (trace.logits if logits_upcast else 0)
    phases["backward"] = static + kept + max(loss_bwd, other_grads)
    done = other_grads
    for i in reversed(range(n)):
        earlier = trace.before + sum(kept_layers[:i])
        if gradient_checkpointing:
            earlier += trace.layers[i] + trace.layer_input  # this layer recomputed, its own input
        else:
            earlier += trace.layers[i]
        done += layer_grads[i]
        # a layer's backward holds the incoming gradient and a few gradients of its activations
        work = 2 * trace.layer_input + 2 * trace.largest_layer_tensor + dequant_workspace
        phases["backward"] = max(phases["backward"], static + earlier + done + work)
    update = grads if device == "cuda" else 2 * largest_trainable
    phases["optimizer step"] = static + grads + update
    phase = max(phases, key=phases.get)
    peak = phases[phase] + runtime
    return StepMemory(
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        activations=kept,
        workspace=update if phase == "optimizer step" else max(0, phases[phase] - static - grads - kept),
        peak=peak,
        peak_phase=phase,
        runtime=runtime,
    )
