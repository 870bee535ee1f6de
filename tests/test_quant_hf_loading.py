"""lorakit.quant.hf_loading: Hugging Face checkpoints straight into 4-bit, and 4-bit checkpoints
that transformers + bitsandbytes read and write."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from fixtures import QUANT_IDS, assert_close_through_foreign_kernels, tiny_llama_2layer
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant.linear4bit import Linear4bit


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama_2layer().save_pretrained(folder)
    return folder


def test_streaming_load_equals_quantizing_the_loaded_model(llama_folder):
    from transformers import LlamaForCausalLM

    from lorakit.quant.hf_loading import load_quantized
    from lorakit.quant.quantize import quantize_model

    streamed = load_quantized(llama_folder)
    reference = quantize_model(LlamaForCausalLM.from_pretrained(llama_folder).eval())
    a, b = streamed.state_dict(), reference.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tying survives
    assert not any(t.device.type == "meta" for t in [*streamed.parameters(), *streamed.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(streamed(QUANT_IDS).logits, reference(QUANT_IDS).logits, rtol=0, atol=0)


def test_load_with_dtype_converts_full_precision_tensors(llama_folder):
    from lorakit.quant.hf_loading import load_quantized

    model = load_quantized(llama_folder, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_dtype == torch.bfloat16 and q.compute_dtype == torch.float32
    with torch.no_grad():
        assert model(QUANT_IDS).logits.dtype == torch.bfloat16


def test_classification_head_missing_from_checkpoint_stays_full_precision(llama_folder):
    from lorakit.quant.hf_loading import load_quantized

    model = load_quantized(llama_folder, task="classification", num_labels=3, skip_modules=[])
    assert type(model.score) is nn.Linear and model.score.weight.std() > 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model(QUANT_IDS[:1]).logits.shape == (1, 3)


def test_save_quantized_reads_back_in_transformers_bitsandbytes(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.quant.hf_loading import load_quantized, save_quantized

    ours = load_quantized(llama_folder)
    save_quantized(ours, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        expected = ours(QUANT_IDS).logits
        assert_close_through_foreign_kernels(hf(QUANT_IDS).logits, expected)
        torch.testing.assert_close(again(QUANT_IDS).logits, expected, rtol=0, atol=0)  # our kernels only


def test_checkpoint_saved_by_transformers_bitsandbytes_loads(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.quant.hf_loading import load_quantized

    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = AutoModelForCausalLM.from_pretrained(llama_folder, quantization_config=qconfig, device_map="cpu")
    hf.save_pretrained(tmp_path / "hf4")
    ours = load_quantized(tmp_path / "hf4")
    q = ours.model.layers[0].self_attn.q_proj
    ref = hf.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    assert torch.equal(q.dequantize(), bnbF.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
    with torch.no_grad():
        assert_close_through_foreign_kernels(ours(QUANT_IDS).logits, hf(QUANT_IDS).logits)


def test_missing_weights_folder_is_a_clear_error(tmp_path):
    from lorakit.quant.hf_loading import load_quantized

    with pytest.raises(QuantizationError, match="no .safetensors"):
        load_quantized(tmp_path)


def test_core_quant_modules_do_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, lorakit.quant; "
        "bad = [m for m in ('transformers', 'lorakit.hf', 'lorakit._heap', 'lorakit.quant.hf_loading') "
        "if m in sys.modules]; assert not bad, bad"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_unknown_task_is_a_config_error_as_in_hf(llama_folder):
    """One error type for one mistake: load_quantized and lorakit.hf.load_model both say ConfigError."""
    from lorakit.errors import ConfigError
    from lorakit.quant.hf_loading import load_quantized

    with pytest.raises(ConfigError, match="task must be one of"):
        load_quantized(llama_folder, task="regression")


def test_heap_trimming_while_loading_is_opt_in(llama_folder, monkeypatch):
    from lorakit.quant import hf_loading

    calls = []
    monkeypatch.setattr(hf_loading, "release_freed_memory", lambda: calls.append(1))
    default = hf_loading.load_quantized(llama_folder)
    assert calls == []
    trimmed = hf_loading.load_quantized(llama_folder, trim_heap=True)
    assert len(calls) == sum(isinstance(m, Linear4bit) for m in trimmed.modules()) > 0
    a, b = default.state_dict(), trimmed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [None, "{not json", '{"model_type": "no-such-architecture"}'])
def test_a_folder_without_a_readable_config_is_a_clear_error(tmp_path, config):
    from safetensors.torch import save_file

    from lorakit.quant.hf_loading import load_quantized

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(QuantizationError, match="cannot read the model's config.json"):
        load_quantized(tmp_path)
