"""lorakit.data.formats: format detection, label maps, prompts."""

from __future__ import annotations

import pytest
from fixtures import CHAT, ROWS, SHAREGPT

from lorakit.data import (
    build_label_map,
    classification_as_instruction,
    detect_format,
    instruction_prompt,
)
from lorakit.errors import ConfigError, DataError

# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "record,fmt",
    [
        ({"text": "a"}, "completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "instruction"),
        ({"messages": CHAT}, "chat"),
        ({"conversations": SHAREGPT}, "chat"),
        ({"text": "a", "label": 1}, "classification"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format([record]) == fmt
    assert detect_format([record], fmt) == fmt


def test_detect_format_errors():
    with pytest.raises(
        DataError,
        match=r"record 1: missing column 'output' needed by the instruction format; columns present: \['input', 'instruction'\]",
    ):
        detect_format([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "x"}])
    with pytest.raises(DataError, match=r"missing column 'label'.*columns present: \['text'\]"):
        detect_format([{"text": "a"}], "classification")
    with pytest.raises(
        DataError, match=r"cannot tell the data format from the columns \['prompt', 'response'\]"
    ):
        detect_format([{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="empty"):
        detect_format([])
    with pytest.raises(ConfigError, match="unknown data format 'alpaca'"):
        detect_format([{"text": "a"}], "alpaca")
    with pytest.raises(DataError, match="column 'text' must be a string"):
        detect_format([{"text": 3}])
    with pytest.raises(DataError, match="record 0: the conversation has no assistant turn"):
        detect_format([{"messages": CHAT[:1]}])
    with pytest.raises(DataError, match=r"record 0, turn 1: unknown role 'bot'"):
        detect_format([{"conversations": [SHAREGPT[0], {"from": "bot", "value": "x"}]}])
    with pytest.raises(
        DataError, match=r"record 0, turn 0: expected an object with 'role' and a string 'content'"
    ):
        detect_format([{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="non-empty list in `messages`"):
        detect_format([{"messages": []}])


def test_build_label_map():
    assert build_label_map([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}, {"label": "mid"}]) == {
        "mid": 0,
        "neg": 1,
        "pos": 2,
    }
    assert build_label_map([{"label": 2}, {"label": 0}]) == {"0": 0, "2": 2}
    assert build_label_map([{"label": "10"}, {"label": "2"}]) == {"2": 2, "10": 10}  # CSV digits stay ints
    with pytest.raises(DataError, match="record 1: missing `label`"):
        build_label_map([{"label": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match="record 0: missing `label`"):
        build_label_map([{"label": float("nan")}, {"label": "b"}])
    assert build_label_map([{"label": 1.0}, {"label": 0}]) == {"0": 0, "1": 1}
    with pytest.raises(DataError, match="at least two different labels"):
        build_label_map([{"label": "a"}, {"label": "a"}])


def test_classification_as_instruction():
    out = classification_as_instruction(ROWS)
    assert out[0] == {
        "instruction": "Classify the text as one of: negative, positive.\n\nText: good film",
        "input": "",
        "output": "positive",
    }
    custom = classification_as_instruction(ROWS, template="Review: {text}\nSentiment:", labels=["x"])
    assert (
        custom[1]["instruction"] == "Review: bad, slow film\nSentiment:" and custom[1]["output"] == "negative"
    )


def test_instruction_prompt_is_alpaca():
    assert instruction_prompt({"instruction": "Add", "input": "1+1", "output": "2"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n1+1\n\n### Response:\n"
    )
    assert instruction_prompt({"instruction": "Hi", "output": "x"}).endswith(
        "### Instruction:\nHi\n\n### Response:\n"
    )


@pytest.mark.parametrize("label", [[1], {"a": 1}])
def test_label_that_is_not_a_scalar_is_a_data_error(label):
    with pytest.raises(DataError, match="record 1: column 'label' must be a string or a number, got"):
        detect_format([{"text": "a", "label": 0}, {"text": "b", "label": label}])
