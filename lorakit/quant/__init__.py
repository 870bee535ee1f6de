"""QLoRA: NF4 4-bit quantization (bitsandbytes-compatible), the frozen 4-bit linear layer, loading
models straight into 4-bit, the bitsandbytes checkpoint form, and merging adapters into a 4-bit base.

    quantize_nf4(w, blocksize=64, double_quant=True) -> (packed, NF4State)     nf4.py
    dequantize_nf4(packed, state, dtype=None) -> Tensor                          nf4.py
    Linear4bit.from_linear(linear, compute_dtype=None, blocksize=64, double_quant=True)
                                                                                 linear4bit.py
    quantize_model(model, skip_modules=DEFAULT_SKIP, ...) -> model              loading.py
    load_quantized(path, task="causal-lm", ...) -> model                        loading.py
    save_quantized(model, folder)                                               loading.py
    state_to_bnb_dict / state_from_bnb_dict                                     bnb_format.py
    merge_to_dense / merge_requantized / requantization_error                   merging.py

Core modules import only torch, safetensors and numpy; `loading` imports transformers lazily,
inside the functions that need it.
"""

from .bnb_format import state_from_bnb_dict, state_to_bnb_dict
from .linear4bit import Linear4bit
from .loading import DEFAULT_SKIP, load_quantized, quantize_model, save_quantized
from .merging import merge_requantized, merge_to_dense, requantization_error
from .nf4 import NF4State, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4State",
    "quantize_nf4",
    "dequantize_nf4",
    "Linear4bit",
    "DEFAULT_SKIP",
    "quantize_model",
    "load_quantized",
    "save_quantized",
    "state_to_bnb_dict",
    "state_from_bnb_dict",
    "merge_to_dense",
    "merge_requantized",
    "requantization_error",
]
