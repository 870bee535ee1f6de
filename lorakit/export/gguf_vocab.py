"""The tokenizer as GGUF metadata, in llama.cpp's conventions.

- A byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen, GPT-2) is `tokenizer.ggml.model = "gpt2"`:
  the token strings as the tokenizer stores them, one type per token (CONTROL for special added
  tokens, USER_DEFINED for other added tokens, UNUSED for ids the vocabulary skips, NORMAL for the
  rest) and the merges.
- A SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, in `tokenizer.json`) is
  `"llama"`, read with the `gguf` package's own `LlamaHfVocab` (tokens, scores, types).

The special token ids, add-BOS/EOS flags and merges come from the `gguf` package's `SpecialVocab`;
the chat template from the tokenizer. `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer, a regex it
implements itself) is read off the tokenizer where its pre-tokenizer is GPT-2's plain byte-level
split ("gpt-2"; "smollm" for SmolLM's vocabulary, as llama.cpp's converter names it), else named
for the families whose pre-tokenizer lorakit knows (Qwen: "qwen2", Llama 3: "llama-bpe"), else
"default" (logged; llama.cpp then uses its default regex). Checked token by token against the GGUF file
that llama.cpp's converter wrote for SmolLM2 (tests/test_export_gguf.py).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .gguf_arch import text_config

log = logging.getLogger(__name__)


def _pre_tokenizer(tokenizer, config, vocab_size: int) -> str:
    """llama.cpp's pre-tokenizer name: from the tokenizer's own pre-tokenizer where it is GPT-2's
    (a plain byte-level split), else for the families lorakit knows (see the module docstring)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    state = json.loads(pre.__getstate__()) if pre is not None else {}
    if state.get("type") == "ByteLevel" and state.get("use_regex", True):
        # GPT-2's regex; llama.cpp names SmolLM's vocabulary (49152 tokens) "smollm" (no space cleanup)
        return "smollm" if vocab_size == 49152 else "gpt-2"
    model_type = getattr(config, "model_type", "")
    if model_type in ("qwen2", "qwen3"):
        return "qwen2"
    if model_type == "llama" and vocab_size >= 128000:
        return "llama-bpe"
    log.warning(
        "tokenizer.ggml.pre: no known pre-tokenizer for this %s tokenizer; writing 'default'", model_type
    )
    return "default"


def _kind(tokenizer) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (BPE with byte fallback), from the fast tokenizer's model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("the GGUF writer needs a fast tokenizer (tokenizer.json); this tokenizer has none")
    model = backend.model
    if type(model).__name__ != "BPE":
        raise ConfigError(
            f"the GGUF writer supports BPE tokenizers (byte-level or with byte fallback), not {type(model).__name__}"
        )
    return "llama" if getattr(model, "byte_fallback", False) else "gpt2"


def _gpt2_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_tokenizer(writer, tokenizer, config) -> None:
    """Write `tokenizer` (a transformers fast tokenizer) into `writer`'s metadata."""
    import gguf
    from gguf.vocab import LlamaHfVocab, SpecialVocab

    vocab_size = text_config(config).vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings"
        )
    with tempfile.TemporaryDirectory(prefix="lorakit-tok-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        kind = _kind(tokenizer)
        writer.add_tokenizer_model(kind)
        if kind == "gpt2":
            tokens, types = _gpt2_tokens(tokenizer, vocab_size)
            writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, text_config(config), vocab_size))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_add_space_prefix(False)
        else:
            entries = list(LlamaHfVocab(folder).all_tokens())
            entries += [
                (f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED)
                for i in range(len(entries), vocab_size)
            ]
            writer.add_tokenizer_pre("default")
            writer.add_token_list([t for t, _, _ in entries])
            writer.add_token_scores([s for _, s, _ in entries])
            writer.add_token_types([int(k) for _, _, k in entries])
        special = SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
        special.chat_template = getattr(tokenizer, "chat_template", None) or None
        special.add_special_token.setdefault("bos", _adds_bos(tokenizer))
        special.add_to_gguf(writer, quiet=True)


def _adds_bos(tokenizer) -> bool:
    """Whether encoding a text puts the BOS token first (llama.cpp's add_bos_token)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and bool(ids) and ids[0] == bos
