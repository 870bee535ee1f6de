"""QLoRA: NF4 4-bit quantization (bitsandbytes-compatible), the frozen 4-bit linear layer, what
gets quantized, loading models straight into 4-bit, the bitsandbytes checkpoint form, and merging
adapters into a 4-bit base.

    quantize_nf4(w, blocksize=64, double_quant=True) -> (packed, NF4State)     nf4.py
    dequantize_nf4(packed, state, dtype=None) -> Tensor                          nf4.py
    nf4_bytes(numel, blocksize=64, double_quant=True) -> int                     nf4.py
    Linear4bit.from_linear(linear, compute_dtype=None, blocksize=64, double_quant=True)
                                                                                 linear4bit.py
    quantized_weights(model) / should_quantize(name, module)  (the rule)        quantize.py
    quantize_model(model, skip_modules=DEFAULT_SKIP, ...) -> model              quantize.py
    state_to_bnb_dict / state_from_bnb_dict                                     bnb_format.py
    load_quantized(path, task="causal-lm", ...) -> model                        hf_loading.py
    save_quantized(model, folder)                                               hf_loading.py
    merge_to_dense / merge_requantized / requantization_error                   merging.py

The core (nf4, linear4bit, quantize, bnb_format, safetensors_io) imports only torch, safetensors,
numpy and itself, and is what this package imports. The other two are loaded on first use (PEP 562
`__getattr__` below): `hf_loading` integrates transformers and `lorakit.hf`, which the core must not
pull in; `merging` works on LoRA layers, which themselves dispatch on `Linear4bit`, so importing it
here would make `lorakit.layers` -> `lorakit.quant` -> `lorakit.merge` -> `lorakit.layers` a cycle.
"""

from .bnb_format import state_from_bnb_dict, state_to_bnb_dict
from .linear4bit import Linear4bit
from .nf4 import NF4State, dequantize_nf4, nf4_bytes, quantize_nf4
from .quantize import DEFAULT_BLOCKSIZE, DEFAULT_SKIP, quantize_model, quantized_weights, should_quantize

_LAZY = {
    "load_quantized": "hf_loading",
    "save_quantized": "hf_loading",
    "merge_to_dense": "merging",
    "merge_requantized": "merging",
    "requantization_error": "merging",
}

__all__ = [
    "NF4State",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_bytes",
    "Linear4bit",
    "DEFAULT_BLOCKSIZE",
    "DEFAULT_SKIP",
    "quantized_weights",
    "should_quantize",
    "quantize_model",
    "state_to_bnb_dict",
    "state_from_bnb_dict",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
