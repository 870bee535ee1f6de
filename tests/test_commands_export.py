"""`lorakit export` (lorakit/commands/export.py): each --format from the command line, the logit
report it prints, QLoRA (--quantize nf4) merged into the dequantized weights, flags that mean
nothing for a format refused before the model loads."""

import gguf
import pytest
import torch
from fixtures import random_lora, tiny_bpe_tokenizer, tiny_family
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-export")
    tok = tiny_bpe_tokenizer()
    model = tiny_family("qwen2", vocab_size=320)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    random_lora(model)
    lorakit.save_adapter(model, d / "adapter")
    return d / "model", d / "adapter", tok


def export(*argv):
    return main(["export", *map(str, argv)])


def test_gguf_prints_what_the_export_cost(setup, tmp_path, capsys):
    model, adapter, tok = setup
    out = tmp_path / "m.gguf"
    assert (
        export("--model", model, "--adapter", adapter, "--format", "gguf", "--type", "q8_0", "--output", out)
        == 0
    )
    text = capsys.readouterr().out
    assert "logits vs the adapter model on 3 fixed prompts" in text
    merged = next(x for x in text.splitlines() if "merged fp32" in x)
    quantized = next(x for x in text.splitlines() if "gguf q8_0" in x)
    assert float(merged.split("max |diff|")[1].split()[0]) < 1e-4
    assert float(quantized.split("max |diff|")[1].split()[0]) > 1e-4  # q8_0 rounds
    reader = gguf.GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[len(tok)] == f"[PAD{len(tok)}]"  # ids the vocabulary does not use
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[5] == gguf.TokenType.NORMAL
    assert types[len(tok)] == gguf.TokenType.UNUSED
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    # transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer (Qwen's regex split): llama.cpp's "qwen2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"


def test_gguf_lora_and_ollama_from_the_command_line(setup, tmp_path, capsys):
    model, adapter, _ = setup
    assert (
        export(
            "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "l.gguf"
        )
        == 0
    )
    assert "llama-cli -m base.gguf --lora" in capsys.readouterr().out
    argv = [
        "--model",
        model,
        "--adapter",
        adapter,
        "--format",
        "ollama",
        "--output",
        tmp_path / "o",
        "--no-check",
    ]
    assert export(*argv) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    assert (tmp_path / "o" / "Modelfile").read_text().startswith("FROM ./model.gguf\n")


def test_qlora_hf_export_is_the_exact_dequantized_merge(setup, tmp_path, capsys):
    from lorakit.generate import load_for_inference
    from lorakit.quant.merging import merge_to_dense

    model, adapter, _ = setup
    out = tmp_path / "hf"
    assert export("--model", model, "--adapter", adapter, "--quantize", "nf4", "--output", out) == 0
    assert "merged hf" in capsys.readouterr().out
    saved = load_file(next(out.glob("*.safetensors")))
    qlora, _, name = load_for_inference(str(model), [str(adapter)], quantize="nf4")
    exact = merge_to_dense(qlora, torch.float32).state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(saved[key], exact[key]), key
    assert not any(k.endswith(("absmax", "quant_map", "quant_state.bitsandbytes__nf4")) for k in saved)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--format", "hf", "--type", "q8_0"], "--type is for the GGUF formats"),
        (["--format", "gguf", "--dtype", "bf16"], "--dtype is for --format hf"),
        (["--format", "gguf-lora", "--type", "q4_0"], "--type for gguf-lora must be one of"),
        (["--format", "gguf-lora", "--no-adapter"], "pass --adapter DIR"),
    ],
)
def test_flags_that_mean_nothing_are_refused_before_loading(setup, tmp_path, capsys, argv, message):
    model, adapter, _ = setup
    adapter_args = [] if "--no-adapter" in argv else ["--adapter", adapter]
    argv = [a for a in argv if a != "--no-adapter"]
    assert export("--model", tmp_path / "missing", *adapter_args, *argv, "--output", tmp_path / "x.gguf") == 1
    assert message in capsys.readouterr().err


def test_existing_output_and_unknown_format(setup, tmp_path, capsys):
    model, adapter, _ = setup
    (tmp_path / "m.gguf").write_bytes(b"keep")
    assert (
        export("--model", model, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "m.gguf")
        == 1
    )
    assert "already exists" in capsys.readouterr().err and (tmp_path / "m.gguf").read_bytes() == b"keep"
    with pytest.raises(SystemExit):
        export("--format", "safetensors", "--output", tmp_path / "y")
