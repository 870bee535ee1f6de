"""The one table that maps a base layer to its LoRA wrapper. First match wins; `register` puts a
user's entry in front of the built-in ones.

A key is a module class (matched with isinstance) or a predicate on the module, which lets the
table name layers of optional packages (transformers' `Conv1D`) without importing them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..modeling import is_conv1d
from ..quant.linear4bit import Linear4bit
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .param import LoraMultiheadAttention

Matcher = type | Callable[[nn.Module], bool]


_BUILTIN: list[tuple[Matcher, type[LoraLayer]]] = [
    (nn.Linear, LoraLinear),
    (is_conv1d, LoraLinear),
    (Linear4bit, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv1d, LoraConv),
    (nn.Conv2d, LoraConv),
    (nn.Conv3d, LoraConv),
    (nn.MultiheadAttention, LoraMultiheadAttention),
]
_USER: list[tuple[Matcher, type[LoraLayer]]] = []


def register(matcher: Matcher, wrapper: type[LoraLayer]) -> None:
    """Wrap modules matched by `matcher` (a class, or a predicate on a module) with `wrapper`.

    User entries are tried before the built-in ones, newest first.
    """
    _USER.insert(0, (matcher, wrapper))


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The wrapper class for `module`, or None if no entry matches."""
    for matcher, wrapper in (*_USER, *_BUILTIN):
        hit = isinstance(module, matcher) if isinstance(matcher, type) else matcher(module)
        if hit:
            return wrapper
    return None
