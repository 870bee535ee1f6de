"""lorakit.quant.quantize: what QLoRA quantizes, and quantizing a model in memory."""

import pytest
from fixtures import tiny_llama_2layer
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant.linear4bit import Linear4bit


def test_quantize_model_replaces_linears_but_not_the_head():
    from lorakit.quant.quantize import quantize_model

    model = quantize_model(tiny_llama_2layer(tie=False))
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is Linear4bit
    assert kinds["model.layers.1.mlp.down_proj"] is Linear4bit
    assert kinds["lm_head"] is nn.Linear and kinds["model.embed_tokens"] is nn.Embedding
    model = quantize_model(tiny_llama_2layer(tie=False), skip_modules=["lm_head", "mlp"])
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    with pytest.raises(QuantizationError, match="already has 4-bit"):
        quantize_model(model)


def test_tied_head_is_never_quantized():
    from lorakit.quant.quantize import quantize_model

    model = quantize_model(tiny_llama_2layer(tie=True), skip_modules=[])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_quantized_weights_is_what_quantize_model_replaces():
    from lorakit.quant.quantize import quantize_model, quantized_weights

    for tie, skip in ((False, ("lm_head",)), (True, ()), (False, ("lm_head", "mlp"))):
        names = quantized_weights(tiny_llama_2layer(tie=tie), skip)
        model = quantize_model(tiny_llama_2layer(tie=tie), skip_modules=skip)
        assert names == [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert "lm_head" not in quantized_weights(tiny_llama_2layer(tie=True), skip_modules=())  # tied


def test_quantized_weights_on_an_injected_model_counts_the_frozen_bases_only():
    import lorakit
    from lorakit.quant.quantize import quantized_weights, should_quantize

    plain = quantized_weights(tiny_llama_2layer(tie=False))
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "lm_head"])
    injected = lorakit.inject(tiny_llama_2layer(tie=False), config)
    expected = [f"{n}.base_layer" if n.endswith(("q_proj", "v_proj")) else n for n in plain]
    assert quantized_weights(injected) == expected  # no lora_A / lora_B, the head still skipped
    assert not should_quantize("model.layers.0.mlp", nn.Module())
    assert not should_quantize("lm_head", nn.Linear(2, 2))
    assert should_quantize("model.layers.0.mlp.up_proj", nn.Linear(2, 2))
