"""What GGUF needs to know about each model family: llama.cpp's architecture name, its
hyperparameter keys, and how a Hugging Face tensor becomes a GGUF tensor.

Tensor names come from the `gguf` package's own mapping (`gguf.get_tensor_name_map`), never from a
table of ours. The per-family facts below are llama.cpp's conventions (as its `convert_hf_to_gguf.py`
applies them), each checked by a test that reads the tensor back:

- Llama and Mistral (llama.cpp's `llama` architecture) store the rows of `q_proj` and `k_proj`
  permuted per head: the two rotary halves of each head are interleaved instead of concatenated
  (Hugging Face's checkpoints use the half-split rotary layout, llama.cpp the pairwise one).
  `permute_rows` does that, `unpermute_rows` undoes it. The Qwen and Gemma families use the
  half-split layout in llama.cpp too, so their rows are written as they are.
- Gemma's RMSNorm multiplies by `1 + weight`; llama.cpp's multiplies by the stored weight, so
  Gemma's norm weights are written plus one. Gemma always ties its output head to the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """One model family: the `gguf.MODEL_ARCH` member name and the conventions it needs."""

    gguf_arch: str
    permute_qk: bool = False
    norm_plus_one: bool = False
    write_head_dim: bool = False  # key_length/value_length keys (families whose head_dim is free)
    head_is_embedding: bool = False  # no output.weight: llama.cpp computes the head with token_embd

    def writes(self, hf_name: str) -> bool:
        """Whether the tensor `hf_name` has a place in the GGUF file."""
        return not (self.head_is_embedding and hf_name == "lm_head.weight")


# Hugging Face `config.model_type` -> family
ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3", write_head_dim=True),
    "gemma": Arch("GEMMA", norm_plus_one=True, write_head_dim=True, head_is_embedding=True),
}


def text_config(config):
    """The language model's config (the config itself for a plain causal LM)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def arch_of(config) -> Arch:
    """The family of a model config; raises `ConfigError` naming the known ones."""
    model_type = getattr(text_config(config), "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(
            f"the GGUF writer does not know the architecture {model_type!r}; it knows {sorted(ARCHS)}. "
            "Export with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHS[model_type]


def gguf_arch_name(arch: Arch) -> str:
    """llama.cpp's name of the architecture (`general.architecture`), e.g. "llama"."""
    import gguf

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)]


def head_counts(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim) of a config."""
    t = text_config(config)
    heads = t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return heads, kv, head_dim


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (weight, bias or LoRA B) from the half-split rotary layout per head
    to llama.cpp's interleaved one: in each head, row i of the first half then row i of the second."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, config, arch: Arch) -> int | None:
    """How many heads to permute `hf_name`'s rows over, or None when it is written as it is."""
    if not arch.permute_qk:
        return None
    heads, kv, _ = head_counts(config)
    if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
        return heads
    if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
        return kv
    return None


class TensorNames:
    """Hugging Face tensor name <-> GGUF tensor name for one model, via `gguf.get_tensor_name_map`."""

    def __init__(self, config, arch: Arch) -> None:
        import gguf

        self.map = gguf.get_tensor_name_map(
            getattr(gguf.MODEL_ARCH, arch.gguf_arch), text_config(config).num_hidden_layers
        )
        self.arch = arch

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name; raises `ConfigError` for a tensor llama.cpp's architecture has no place for."""
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(
                f"tensor {hf_name!r} has no GGUF name in llama.cpp's {gguf_arch_name(self.arch)!r} architecture "
                "(the gguf package's name map); this model differs from the family it claims"
            )
        return name


def to_gguf(hf_name: str, tensor: torch.Tensor, config, arch: Arch) -> torch.Tensor:
    """A Hugging Face tensor in the layout llama.cpp expects (fp32)."""
    t = tensor.float()
    heads = qk_heads(hf_name, config, arch)
    if heads is not None:
        t = permute_rows(t, heads)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        t = t + 1
    return t


def from_gguf(hf_name: str, tensor: torch.Tensor, config, arch: Arch) -> torch.Tensor:
    """The inverse of `to_gguf` (for reading a written file back)."""
    t = tensor.float()
    heads = qk_heads(hf_name, config, arch)
    if heads is not None:
        t = unpermute_rows(t, heads)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        t = t - 1
    return t


def add_hparams(writer, config, arch: Arch) -> None:
    """Write the architecture's hyperparameter keys (`llama.block_count`, ...) from `config`."""
    t = text_config(config)
    heads, kv, head_dim = head_counts(config)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_vocab_size(t.vocab_size)
    rope = dict(getattr(t, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(t, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    _add_rope_scaling(writer, rope)
    if arch.write_head_dim or head_dim != t.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.permute_qk:
        writer.add_rope_dimension_count(head_dim)


def _add_rope_scaling(writer, rope: dict) -> None:
    import gguf

    kind = rope.get("rope_type", "default")
    if kind in (None, "default"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise ConfigError(
        f"the GGUF writer supports rope_type 'default' and 'linear', not {kind!r} (from the model's "
        "rope_parameters); export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
    )
