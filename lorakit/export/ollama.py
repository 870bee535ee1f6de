"""An Ollama model folder: the merged GGUF and a `Modelfile` (`ollama create NAME -f Modelfile`).

Ollama's `TEMPLATE` is a Go template, not the Jinja chat template transformers uses, so it is not
converted by parsing the Jinja (which can do anything) but recognised: each known format has a Go
template and a renderer of what that Go template produces; the model's own chat template is run
(`apply_chat_template`) on a few conversations and must produce exactly what the renderer does.
Known formats: ChatML (`<|im_start|>role ... <|im_end|>`: SmolLM2, Qwen) and Llama 3
(`<|start_header_id|>role<|end_header_id|>`). A default system prompt that the Jinja template adds
when a conversation has none becomes the Modelfile's `SYSTEM`. Any other template is refused with
a `ConfigError` that says how to proceed (write the TEMPLATE by hand, or export `--format gguf`,
which keeps the Jinja template in the GGUF metadata for llama.cpp).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._atomic import atomic_folder, atomic_write_text, clean_stale
from ..errors import ConfigError, storage_errors
from .gguf import export_gguf
from .hf import check_output

_CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_LLAMA3_GO = (
    "<|begin_of_text|>"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat format Ollama's Go templates can express: the template, a renderer of what it
    produces (for the check against the Jinja template) and the stop strings."""

    name: str
    go_template: str
    stops: tuple[str, ...]

    def render(self, messages: list[dict]) -> str:
        """What `go_template` renders for `messages`, followed by the assistant's turn."""
        if self.name == "chatml":
            body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return body + "<|im_start|>assistant\n"
        body = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
        )
        return "<|begin_of_text|>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


FORMATS = (
    ChatFormat("chatml", _CHATML_GO, ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", _LLAMA3_GO, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)

_CONVERSATIONS = (
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
)


def _jinja(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _default_system(tokenizer, fmt: ChatFormat) -> str | None:
    """The system prompt the Jinja template adds to a conversation without one (None if none)."""
    user = [{"role": "user", "content": "Hi there"}]
    got = _jinja(tokenizer, user)
    if got == fmt.render(user):
        return None
    for start in ("<|im_start|>system\n", "<|start_header_id|>system<|end_header_id|>\n\n"):
        end = "<|im_end|>" if start.startswith("<|im_start|>") else "<|eot_id|>"
        at = got.find(start)
        if at >= 0 and end in got[at:]:
            system = got[at + len(start) : got.index(end, at)]
            if got == fmt.render([{"role": "system", "content": system}, *user]):
                return system
    return None


def chat_format(tokenizer) -> tuple[ChatFormat, str | None]:
    """(the known format `tokenizer`'s chat template renders, its default system prompt); raises
    `ConfigError` when it matches none (see the module docstring)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template, so there is no TEMPLATE for the Modelfile; "
            "export --format gguf and write the Modelfile yourself"
        )
    for fmt in FORMATS:
        try:
            if all(_jinja(tokenizer, c) == fmt.render(c) for c in _CONVERSATIONS):
                return fmt, _default_system(tokenizer, fmt)
        except Exception:  # a template may raise on roles it does not know: not this format
            continue
    raise ConfigError(
        f"cannot translate this chat template to Ollama's Go template: it renders neither of the formats "
        f"lorakit knows ({', '.join(f.name for f in FORMATS)}). Export --format gguf (llama.cpp reads the "
        "Jinja template from the GGUF) and write the Modelfile's TEMPLATE by hand"
    )


def modelfile(tokenizer, gguf_name: str) -> str:
    """The Modelfile text for `gguf_name` (a file beside it)."""
    fmt, system = chat_format(tokenizer)
    stops = list(fmt.stops)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{fmt.go_template}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_ollama(
    model, tokenizer, output: str | os.PathLike, type: str = "q8_0", overwrite: bool = False
) -> Path:
    """Write an Ollama folder at `output`: `model.gguf` (`export_gguf` of `type`) and `Modelfile`.
    The folder appears whole or not at all. Raises `ConfigError` for a template Ollama cannot be
    given (checked before anything is written), and what `export_gguf` raises."""
    output = Path(output)
    check_output(output, overwrite)
    text = modelfile(tokenizer, "model.gguf")
    clean_stale(output.parent)
    with storage_errors(output), atomic_folder(output) as tmp:
        export_gguf(model, tokenizer, tmp / "model.gguf", type=type)
        atomic_write_text(tmp / "Modelfile", text)
    return output
