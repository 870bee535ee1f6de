"""lorakit.export.gguf_lora (`lorakit export --format gguf-lora`): the llama.cpp LoRA file read back
with `gguf.GGUFReader`: keys, A/B tensors equal to the adapter's (B rows permuted where the base's
q/k rows are), and base GGUF weight + alpha/r * B @ A equal to the merged GGUF weight."""

import gguf
import pytest
import torch
from fixtures import random_lora, tiny_family

import lorakit
from lorakit.errors import ConfigError
from lorakit.export import export_gguf, export_gguf_lora, read_gguf_lora
from lorakit.export.gguf_arch import unpermute_rows


def gguf_weights(path):
    import numpy as np

    return {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        for t in gguf.GGUFReader(path).tensors
    }


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_file_holds_a_and_b_and_applies_like_the_merge(family, tmp_path):
    model = random_lora(tiny_family(family))
    out = export_gguf_lora(model, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == family
    alpha, pairs = read_gguf_lora(out)
    assert alpha == 8.0 and len(pairs) == 2 * 7  # 2 layers x 7 projections
    attn = model.model.layers[0].self_attn
    a, b = pairs["blk.0.attn_q.weight"]
    assert torch.equal(a, attn.q_proj.lora_A["default"].weight)
    stored_b = unpermute_rows(b, 4) if family == "llama" else b
    assert torch.equal(stored_b, attn.q_proj.lora_B["default"].weight)
    assert torch.equal(
        pairs["blk.1.ffn_down.weight"][1], model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    )
    # llama.cpp's arithmetic on the files: W_base + alpha / r * B @ A == W_merged, in GGUF layout
    with lorakit.disable_adapters(model):
        base = gguf_weights(export_gguf(model, None, tmp_path / "base.gguf", type="f32"))
    merged = gguf_weights(export_gguf(model, None, tmp_path / "merged.gguf", type="f32"))
    for name, (a, b) in pairs.items():
        torch.testing.assert_close(
            base[name] + alpha / a.shape[0] * b @ a, merged[name], atol=1e-5, rtol=1e-5
        )


def test_rslora_scaling_is_folded_into_b_and_f16(tmp_path):
    model = random_lora(tiny_family("qwen3"), use_rslora=True)
    alpha, pairs = read_gguf_lora(export_gguf_lora(model, tmp_path / "l.gguf", type="f16"))
    layer = model.model.layers[0].self_attn.v_proj
    a, b = pairs["blk.0.attn_v.weight"]
    expected = layer.delta_weight("default")  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(alpha / a.shape[0] * b @ a, expected, atol=2e-3, rtol=2e-3)
    t = next(
        t for t in gguf.GGUFReader(tmp_path / "l.gguf").tensors if t.name == "blk.0.attn_v.weight.lora_b"
    )
    assert t.tensor_type == gguf.GGMLQuantizationType.F16


def test_embedding_adapter_uses_llama_cpp_layout(tmp_path):
    model = random_lora(tiny_family("qwen2"), target_modules=["embed_tokens", "q_proj"])
    _, pairs = read_gguf_lora(export_gguf_lora(model, tmp_path / "l.gguf"))
    emb = model.model.embed_tokens
    a, b = pairs["token_embd.weight"]
    assert torch.equal(a, emb.lora_embedding_A["default"].T)  # [num_embeddings, r]
    assert torch.equal(b, emb.lora_embedding_B["default"])  # [dim, r]


def test_what_a_llama_cpp_lora_cannot_hold_is_refused(tmp_path):
    model = random_lora(tiny_family("llama", tie_word_embeddings=True), target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="tied to the embedding"):
        export_gguf_lora(model, tmp_path / "l.gguf")
    model = random_lora(tiny_family("llama"), modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        export_gguf_lora(model, tmp_path / "l.gguf")
    model = random_lora(tiny_family("llama"))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "second")
    lorakit.set_adapter(model, ["default", "second"])
    with pytest.raises(ConfigError, match="holds one adapter"):
        export_gguf_lora(model, tmp_path / "l.gguf")
    lorakit.set_adapter(model, "default")
    with pytest.raises(ConfigError, match="must be one of"):
        export_gguf_lora(model, tmp_path / "l.gguf", type="q4_0")
    assert not list(tmp_path.iterdir())
