"""`recommend(setup, budget)`: settings that fit a memory budget, or why none does.

The search is a small grid: method (the one asked for first, then LoRA, then QLoRA), rank (the one
asked for, then halved twice), batch size (the one asked for, halved down to 1) and gradient
checkpointing (off, then on). The first setup that fits wins, so the answer keeps as much of what
was asked as it can: quality (method, rank) before speed (batch size, no recomputation). A
smaller batch loses nothing with gradient accumulation, which the recommendation states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .estimate import Estimate, PlanSetup, estimate
from .units import human


@dataclass
class Recommendation:
    """The chosen setup (None when nothing fits), its estimate, the budget and a one-line reason."""

    budget: int
    setup: PlanSetup | None
    estimate: Estimate | None
    reason: str
    tried: int

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget,
            "fits": self.setup is not None,
            "reason": self.reason,
            "setups_tried": self.tried,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


def _grid(setup: PlanSetup):
    methods = [setup.method] + [m for m in ("lora", "qlora") if m != setup.method]
    ranks = sorted({max(1, setup.r >> k) for k in range(3)}, reverse=True)
    batches = sorted(
        {max(1, setup.batch_size >> k) for k in range(setup.batch_size.bit_length())}, reverse=True
    )
    for method in methods:
        for r in ranks if method != "full" else [setup.r]:
            for batch in batches:
                for gc in (False, True):
                    yield dataclasses.replace(
                        setup, method=method, r=r, batch_size=batch, gradient_checkpointing=gc
                    )


def recommend(setup: PlanSetup, budget: int) -> Recommendation:
    """The first setup of the grid (see the module docstring) whose predicted peak fits `budget`
    bytes; when none fits, the reason names the smallest setup and what alone exceeds the budget.
    Raises `ConfigError` for a budget that is not positive."""
    if budget <= 0:
        raise ConfigError(f"budget must be positive, got {budget} bytes")
    tried = 0
    smallest: Estimate | None = None
    for candidate in _grid(setup):
        tried += 1
        est = estimate(candidate)
        if smallest is None or est.memory.peak < smallest.memory.peak:
            smallest = est
        if est.memory.peak <= budget:
            return Recommendation(budget, candidate, est, _why_fits(setup, candidate), tried)
    assert smallest is not None
    return Recommendation(budget, None, None, _why_not(smallest, budget), tried)


def _why_fits(asked: PlanSetup, chosen: PlanSetup) -> str:
    changes = [
        f"{name} {getattr(asked, name)} -> {getattr(chosen, name)}"
        for name in ("method", "r", "batch_size", "gradient_checkpointing")
        if getattr(asked, name) != getattr(chosen, name)
    ]
    if not changes:
        return "the setup as asked fits"
    note = ""
    if chosen.batch_size < asked.batch_size:
        steps = -(-asked.batch_size // chosen.batch_size)
        note = f"; accumulate gradients over {steps} steps to keep an effective batch of {asked.batch_size}"
    return "changed " + ", ".join(changes) + note


def _why_not(smallest: Estimate, budget: int) -> str:
    s, mem = smallest.setup, smallest.memory
    fixed = mem.weights + mem.gradients + mem.optimizer
    culprit = (
        f"the weights alone take {human(mem.weights)}"
        if mem.weights > budget
        else f"weights, gradients and optimizer state take {human(fixed)}"
        if fixed > budget
        else f"activations at seq_len {s.seq_len} add {human(mem.peak - fixed)}; shorten the sequences"
    )
    return (
        f"nothing fits: the smallest setup tried ({s.method}, r={s.r}, batch 1, "
        f"gradient checkpointing) needs {human(mem.peak)}; {culprit}"
    )
