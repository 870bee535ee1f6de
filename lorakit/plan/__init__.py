"""`lorakit plan`: what full fine-tuning, LoRA and QLoRA of a model cost, from its shape alone.

    estimate(PlanSetup(model="gpt3-175b", method="lora", r=4, target_modules=("q_proj", "v_proj")))
    compare(setup) -> {"full": Estimate, "lora": ..., "qlora": ...}
    recommend(setup, budget_bytes) -> Recommendation

The model is built on PyTorch's `meta` device (no weights read, no memory used), LoRA is applied
with lorakit's own `inject`, and activation memory is traced from a meta forward pass.
"""

from ..quant.nf4 import nf4_bytes
from .estimate import METHODS, Estimate, PlanSetup, compare, estimate
from .memory import StepMemory
from .recommend import Recommendation, recommend
from .units import parse_size

__all__ = [
    "METHODS",
    "Estimate",
    "PlanSetup",
    "Recommendation",
    "StepMemory",
    "compare",
    "estimate",
    "nf4_bytes",
    "parse_size",
    "recommend",
]
