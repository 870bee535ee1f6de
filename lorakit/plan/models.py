"""Model shapes for `lorakit plan`: a transformers config from a name, folder, `config.json` or GGUF
file, and the model built from it on PyTorch's `meta` device (no weights read, no memory used).

Built-in names cover well-known shapes. `gpt3-175b` has the GPT-3 paper's dimensions (96 layers,
d_model 12288, 96 heads, d_ff 49152, vocab 50257, context 2048). It is built as a Starcoder2
config because that is the transformers architecture closest to GPT-3 whose attention has separate
`q_proj`, `k_proj`, `v_proj`, `o_proj` projections: a two-matrix GELU MLP of width 4 x d_model
(`c_fc`, `c_proj`), LayerNorm, biases everywhere, tied embeddings. It differs from GPT-3 in using
rotary positions instead of learned ones (GPT-3's 2048 x 12288 = 25M position parameters are
missing, 0.01% of the total: 174.58B here against the paper's 175B) and dense instead of banded
sparse attention layers (same weights, same activation shapes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import auto_model_class


def _seven_b(vocab: int, intermediate: int, kv_heads: int, context: int, **extra: Any) -> dict[str, Any]:
    """The 32-layer, 4096-wide shape the 7-8B Llama-family models share."""
    return dict(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=intermediate,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        **extra,
    )


# name -> (model_type, config kwargs)
BUILTIN: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt3-175b": (
        "starcoder2",
        dict(
            vocab_size=50257,
            hidden_size=12288,
            intermediate_size=49152,
            num_hidden_layers=96,
            num_attention_heads=96,
            num_key_value_heads=96,
            max_position_embeddings=2048,
            hidden_act="gelu",
            use_bias=True,
            tie_word_embeddings=True,
            sliding_window=None,
        ),
    ),
    "gpt2": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    "llama-2-7b": ("llama", _seven_b(vocab=32000, intermediate=11008, kv_heads=32, context=4096)),
    "llama-3-8b": ("llama", _seven_b(vocab=128256, intermediate=14336, kv_heads=8, context=8192)),
    "mistral-7b": (
        "mistral",
        _seven_b(vocab=32000, intermediate=14336, kv_heads=8, context=32768, sliding_window=None),
    ),
    # mistralai/Mixtral-8x7B-v0.1's config.json: Mistral-7B's shape with 8 experts, 2 per token
    "mixtral-8x7b": (
        "mixtral",
        _seven_b(
            vocab=32000,
            intermediate=14336,
            kv_heads=8,
            context=32768,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    # Qwen/Qwen3-30B-A3B's config.json: 48 layers, 128 experts of width 768, 8 per token
    "qwen3-30b-a3b": (
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
    ),
}

ATTENTION = ("sdpa", "eager")
_PLAN_SDPA = "lorakit_plan_sdpa"


def model_names() -> list[str]:
    """The built-in model names, plus the embedded default."""
    from ..hf import DEFAULT_MODEL

    return [DEFAULT_MODEL, *BUILTIN]


def load_config(model: str):
    """A transformers config for `model`: a built-in name (see `BUILTIN`), the embedded default,
    a Hugging Face folder, a `config.json` file, a `.gguf` file (only its metadata is read) or a
    Hub ID (only its config.json is fetched, through the Hugging Face cache).

    Raises `ConfigError` when the model is not found or its config cannot be read.
    """
    import transformers

    if model in BUILTIN:
        model_type, kwargs = BUILTIN[model]
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        config._name_or_path = model
        return config
    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            data = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
            return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if "model_type" not in data:
                raise ConfigError(f"{path}: no 'model_type' key; give a transformers config.json")
            return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        from ..hf import hub_folder, resolve

        if not path.exists() and model not in model_names():  # a Hub ID: its config.json is enough
            return transformers.AutoConfig.from_pretrained(hub_folder(model, patterns=("config.json",)))

        return transformers.AutoConfig.from_pretrained(resolve(model))
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{model}: cannot read a model config ({e})") from None


def build_meta_model(config, task: str = "causal-lm", attention: str = "sdpa") -> nn.Module:
    """The model for `config` on the `meta` device, in train mode.

    `attention` "sdpa" routes attention through PyTorch's fused kernel (what a real run uses: it
    keeps only the output and log-sum-exp for backward), "eager" through the plain softmax path
    (keeps the [batch, heads, seq, seq] probabilities). Raises `ConfigError` for an unknown value.
    """

    if attention not in ATTENTION:
        raise ConfigError(f"attention must be one of {ATTENTION}, got {attention!r}")
    _register_fused_attention()
    impl = _PLAN_SDPA if attention == "sdpa" else "eager"
    auto = auto_model_class(task)
    with torch.device("meta"):
        try:
            model = auto.from_config(config, attn_implementation=impl)
        except ValueError:  # an architecture that does not take pluggable attention
            model = auto.from_config(config)
    return model.train()


def _fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What SDPA's fused CPU/GPU kernels keep for backward (q, k, v, output, log-sum-exp), on meta.

    On `meta` tensors PyTorch's SDPA dispatcher picks the math fallback, which would count a
    [batch, heads, seq, seq] matrix that a real run never keeps; calling the fused kernel's op
    directly records what a real run saves.
    """
    causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout, causal, attn_mask=attention_mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _register_fused_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_PLAN_SDPA, _fused_attention)
    AttentionMaskInterface.register(_PLAN_SDPA, sdpa_mask)
