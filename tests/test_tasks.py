"""lorakit.tasks: the shared vocabulary (task names, ignore label, target-modules rule)."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.tasks import IGNORE_INDEX, TASKS, check_task, parse_target_modules


def test_ignore_index_is_pytorchs_cross_entropy_default():
    import inspect

    import torch.nn.functional as F

    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX


def test_check_task_names_the_choices():
    assert [check_task(t) for t in TASKS] == list(TASKS)
    with pytest.raises(ConfigError, match="task must be one of"):
        check_task("regression")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all-linear", "all-linear"),
        (" q_proj, v_proj ", ["q_proj", "v_proj"]),
        ("q_proj v_proj", ["q_proj", "v_proj"]),
        (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    ],
)
def test_parse_target_modules(text, expected):
    assert parse_target_modules(text) == expected


def test_empty_target_modules_is_refused():
    with pytest.raises(ConfigError, match="target_modules is empty"):
        parse_target_modules(" , ")


def test_every_task_has_a_peft_type_and_a_transformers_class():
    import transformers

    from lorakit.tasks import AUTO_CLASS_NAMES, PEFT_TASK_TYPES, auto_model_class

    assert set(PEFT_TASK_TYPES) == set(AUTO_CLASS_NAMES) == set(TASKS)
    assert {PEFT_TASK_TYPES[t] for t in TASKS} == {"CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"}
    import peft

    assert {PEFT_TASK_TYPES[t] for t in TASKS} <= {t.value for t in peft.TaskType}
    for task in TASKS:
        assert auto_model_class(task) is getattr(transformers, AUTO_CLASS_NAMES[task])


def test_model_task_reads_the_model():
    from fixtures import tiny_bert_classifier, tiny_llama
    from transformers import BertConfig, BertForTokenClassification, T5Config, T5ForConditionalGeneration

    from lorakit.tasks import model_task

    tiny = dict(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    bert = dict(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert model_task(tiny_llama()) == "causal-lm"
    assert model_task(tiny_bert_classifier()) == "classification"
    assert model_task(T5ForConditionalGeneration(T5Config(**tiny))) == "seq2seq"
    assert model_task(BertForTokenClassification(BertConfig(**bert))) == "token-classification"


def test_train_help_lists_the_tasks(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for task in TASKS:
        assert task in text
    assert "--add-tokens" in text and "--chat-template" in text
