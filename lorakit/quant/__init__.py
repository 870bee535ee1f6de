"""QLoRA: NF4 4-bit quantization (bitsandbytes-compatible), the frozen 4-bit linear layer, loading
models straight into 4-bit, bitsandbytes checkpoint format, and merging adapters into a 4-bit base.

Only torch, safetensors and numpy are imported here; `loading` imports transformers lazily.
"""

from .nf4 import NF4State, dequantize_nf4, quantize_nf4

__all__ = ["NF4State", "quantize_nf4", "dequantize_nf4"]
