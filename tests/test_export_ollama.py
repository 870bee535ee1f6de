"""lorakit.export.ollama (`lorakit export --format ollama`): the Modelfile's TEMPLATE is recognised
from what the model's Jinja chat template renders (SmolLM2's ChatML with its default system prompt,
a Llama 3 template), templates it cannot express are refused before anything is written."""

import copy

import pytest
from fixtures import tiny_family

import lorakit.hf
from lorakit.errors import ConfigError
from lorakit.export import export_ollama
from lorakit.export.ollama import FORMATS, chat_format, modelfile

LLAMA3_JINJA = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return lorakit.hf.load_tokenizer("smollm2-135m")


def test_smollm2_chatml_modelfile(tok):
    text = modelfile(tok, "model.gguf")
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    # SmolLM2's template adds this system prompt when a chat has none; Ollama adds SYSTEM the same way
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert [x for x in lines if x.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_start|>"',
        'PARAMETER stop "<|im_end|>"',
    ]
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    fmt, _ = chat_format(tok)
    assert fmt.render(chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_llama3_template_is_recognised_and_others_refused(tok):
    llama3 = copy.deepcopy(tok)
    llama3.chat_template = LLAMA3_JINJA
    fmt, system = chat_format(llama3)
    assert fmt is FORMATS[1] and system is None
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile(llama3, "m.gguf")
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    )
    with pytest.raises(ConfigError, match="cannot translate this chat template to Ollama's Go template"):
        chat_format(odd)
    odd.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        chat_format(odd)


def test_folder_holds_the_gguf_and_modelfile_and_refuses_to_overwrite(tok, tmp_path):
    model = tiny_family("llama", vocab_size=len(tok), num_hidden_layers=1)
    out = export_ollama(model, tok, tmp_path / "ollama", type="q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF"  # its contents: tests/test_export_gguf.py
    assert (out / "Modelfile").read_text() == modelfile(tok, "model.gguf")
    with pytest.raises(ConfigError, match="not empty"):
        export_ollama(model, tok, out)
    odd = copy.deepcopy(tok)
    odd.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="cannot translate"):
        export_ollama(model, odd, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ollama"]
