"""Plain nn.Module structure helpers (lorakit.modeling) on real transformers models."""

import torch
from fixtures import tiny_bert_classifier, tiny_gpt2, tiny_llama
from transformers import LlamaForSequenceClassification

import lorakit
from lorakit import LoraConfig, modeling


def test_replace_module_at_top_level_and_nested():
    model = tiny_llama()
    new = torch.nn.Identity()
    modeling.replace_module(model, "model.layers.1.mlp", new)
    assert model.model.layers[1].mlp is new
    modeling.replace_module(model, "lm_head", new)
    assert model.lm_head is new


def test_output_heads_lm_head_or_classifier():
    assert modeling.output_head_names(tiny_llama()) == {"lm_head"}
    assert modeling.output_head_names(tiny_bert_classifier()) == {"classifier"}
    score = tiny_llama(cls=LlamaForSequenceClassification, num_labels=2)
    assert modeling.output_head_names(score) == {"score"}
    assert modeling.classifier_heads(score) == ["score"] and modeling.classifier_heads(tiny_llama()) == []
    assert modeling.is_causal_lm(tiny_llama()) and not modeling.is_causal_lm(score)


def test_tied_weights_are_seen_through_wrappers():
    tied = tiny_llama(tie_word_embeddings=True)
    assert modeling.tied_heads(tied) == {"lm_head"}
    assert modeling.tied_heads(tiny_llama()) == set()
    lorakit.inject(tied, LoraConfig(target_modules=["embed_tokens"]))
    emb, head = modeling.tied_embeddings(tied)
    assert emb is tied.model.embed_tokens and head is tied.lm_head
    assert modeling.tied_embeddings(tiny_llama()) is None
    owners = modeling.parameter_names(tied)
    assert owners[id(tied.lm_head.weight)] == ["model.embed_tokens.base_layer.weight", "lm_head.weight"]


def test_decoder_layers_and_conv1d():
    model = tiny_gpt2()
    assert modeling.decoder_layers(model) is model.transformer.h
    assert modeling.decoder_layers(torch.nn.Linear(2, 2)) is not None
    assert len(modeling.decoder_layers(torch.nn.Linear(2, 2))) == 0
    assert modeling.is_conv1d(model.transformer.h[0].attn.c_attn)
    assert not modeling.is_conv1d(torch.nn.Linear(2, 2))
