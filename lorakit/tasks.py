"""The vocabulary every part of lorakit shares, defined once: the task names, the ignore label of
the loss, and how a `--target-modules` string is read.

Dependency-free (no torch; transformers only inside `auto_model_class`), so any module, core or
integration, may import it.
"""

from __future__ import annotations

from .errors import ConfigError

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "classification"
SEQ2SEQ = "seq2seq"
TOKEN_CLASSIFICATION = "token-classification"
TASKS = (CAUSAL_LM, CLASSIFICATION, SEQ2SEQ, TOKEN_CLASSIFICATION)
# tasks whose model gets a new head sized by `num_labels` (trained in full, modules_to_save)
LABEL_TASKS = (CLASSIFICATION, TOKEN_CLASSIFICATION)

# PEFT task_type of each task (what adapter_config.json records)
PEFT_TASK_TYPES = {
    CAUSAL_LM: "CAUSAL_LM",
    CLASSIFICATION: "SEQ_CLS",
    SEQ2SEQ: "SEQ_2_SEQ_LM",
    TOKEN_CLASSIFICATION: "TOKEN_CLS",
}

# the transformers Auto class that builds each task's model (`auto_model_class`)
AUTO_CLASS_NAMES = {
    CAUSAL_LM: "AutoModelForCausalLM",
    CLASSIFICATION: "AutoModelForSequenceClassification",
    SEQ2SEQ: "AutoModelForSeq2SeqLM",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
}

# label of a position the loss skips (prompt tokens, padding): PyTorch's cross_entropy default
IGNORE_INDEX = -100

_REGEX_CHARS = "\\^$*+?()[]|"


def check_task(task: str) -> str:
    """Return `task` if it is one of `TASKS`; raise `ConfigError` naming the choices otherwise."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: task must be one of {list(TASKS)}")
    return task


def auto_model_class(task: str):
    """The transformers Auto class for `task` (imported only when called, so this module stays
    light). Raises `ConfigError` for an unknown task."""
    import transformers

    return getattr(transformers, AUTO_CLASS_NAMES[check_task(task)])


def model_task(model) -> str:
    """The task a loaded model's forward serves, read from the model itself (transformers' class
    names and `config.is_encoder_decoder`): what the loss and the evaluation need to know, since a
    [batch, length] label tensor means next tokens (causal LM), decoder targets (seq2seq) or one tag
    per token (token classification). Anything else is taken for a causal LM."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if name.endswith("ForTokenClassification"):
        return TOKEN_CLASSIFICATION
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return SEQ2SEQ
    return CAUSAL_LM


def parse_target_modules(text: str) -> str | list[str]:
    """A `--target-modules` value as `LoraConfig` takes it: "all-linear", a regex (when any of
    \\^$*+?()[]| is in it, matched against the whole module name), or a list of module names
    separated by commas or spaces. Raises `ConfigError` for an empty value."""
    t = str(text).strip()
    if t == "all-linear" or any(c in t for c in _REGEX_CHARS):
        return t
    names = [n for n in t.replace(",", " ").split() if n]
    if not names:
        raise ConfigError("target_modules is empty; give 'all-linear', module names or a regex")
    return names
