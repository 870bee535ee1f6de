"""Tiny random-weight models shared by the tests (fast on CPU, real transformers classes)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_llama(seed: int = 0, cls: type = LlamaForCausalLM, **overrides) -> LlamaForCausalLM:
    """A small random Llama; `overrides` replace config fields, `cls` picks the head class."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return cls(LlamaConfig(**{**shape, **overrides})).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
