"""LoRA wrappers, one file per base-layer family, and the dispatch table that picks one."""

from .base import LoraLayer
from .conv import LoraConv, conv_delta
from .dispatch import register, wrapper_for
from .embedding import LoraEmbedding, embedding_delta
from .linear import LoraLinear, linear_delta
from .modules_to_save import ModulesToSave
from .param import LoraMultiheadAttention, LoraParam, param_delta
from .routing import Routing
from .trainable_tokens import TrainableTokens

__all__ = [
    "LoraLayer",
    "Routing",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "ModulesToSave",
    "LoraParam",
    "LoraMultiheadAttention",
    "param_delta",
    "register",
    "wrapper_for",
    "linear_delta",
    "embedding_delta",
    "conv_delta",
    "TrainableTokens",
]
