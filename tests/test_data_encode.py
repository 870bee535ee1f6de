"""lorakit.data.encode: loss masks checked against SmolLM2's real tokenizer, piece by piece."""

from __future__ import annotations

import copy

import pytest
from fixtures import CHAT, NER, ROWS, SHAREGPT
from fixtures import chat_expectation as _chat_expectation
from fixtures import token_ids as ids

from lorakit.data import (
    IGNORE_INDEX,
    build_label_map,
    build_tag_map,
    classification_as_instruction,
    encode,
    instruction_prompt,
)
from lorakit.errors import ConfigError, DataError

# ---------------------------------------------------------------- encode (real SmolLM2 tokenizer)


def test_encode_completion_learns_every_token_and_eos(tok):
    enc = encode([{"text": "The cat sat."}], tok, "completion", max_length=64)
    expected = ids(tok, "The cat sat.", True) + [tok.eos_token_id]
    assert enc.examples == [{"input_ids": expected, "labels": expected}]
    assert enc.truncated == 0
    assert enc.examples[0]["labels"] is not enc.examples[0]["input_ids"]
    assert encode([{"text": "The cat sat."}], tok, None, max_length=64).examples == enc.examples  # detected


def test_encode_instruction_masks_the_prompt(tok):
    record = {"instruction": "Add", "input": "1+1", "output": "2"}
    ex = encode([record], tok, "instruction", max_length=256).examples[0]
    prompt = ids(tok, instruction_prompt(record), True)
    answer = ids(tok, "2") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_encode_chat_learns_only_assistant_turns(tok):
    input_ids, labels = _chat_expectation(tok)
    assert input_ids == ids(
        tok, tok.apply_chat_template(CHAT, tokenize=False)
    )  # pieces tokenize like the whole
    ex = encode([{"messages": CHAT}], tok, "chat", max_length=512).examples[0]
    assert ex["input_ids"] == input_ids
    assert ex["labels"] == labels
    sharegpt = encode([{"conversations": SHAREGPT}], tok, "chat", max_length=512).examples[0]
    assert sharegpt == ex


def test_encode_chat_accepts_sharegpt_keys_inside_messages(tok):
    mixed = [SHAREGPT[0], CHAT[1], SHAREGPT[2], CHAT[3]]
    assert (
        encode([{"messages": mixed}], tok, "chat", max_length=512).examples
        == encode([{"messages": CHAT}], tok, "chat", max_length=512).examples
    )


def test_encode_never_doubles_eos(tok):
    from tokenizers.processors import TemplateProcessing

    adds_eos = copy.deepcopy(tok)  # a tokenizer that appends EOS itself, like add_eos_token=True
    adds_eos._tokenizer.post_processor = TemplateProcessing(
        single="$A <|im_end|>", special_tokens=[("<|im_end|>", tok.eos_token_id)]
    )
    assert ids(adds_eos, "The cat", True)[-1] == tok.eos_token_id
    ex = encode([{"text": "The cat"}], adds_eos, "completion", max_length=64).examples[0]
    assert ex["input_ids"] == ids(tok, "The cat", True) + [tok.eos_token_id]


def test_encode_chat_with_system_message(tok):
    chat = [{"role": "system", "content": "Be brief."}, *CHAT[:2]]
    ex = encode([{"messages": chat}], tok, "chat", max_length=512).examples[0]
    learned = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert learned == ids(tok, "Hello there<|im_end|>")
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_encode_truncates_and_counts(tok):
    long = {"text": " ".join(["word"] * 50)}
    enc = encode([long, {"text": "short"}], tok, "completion", max_length=10)
    assert enc.truncated == 1 and enc.dropped == 0
    assert [len(e["input_ids"]) for e in enc.examples] == [10, 2]
    assert enc.examples[0]["input_ids"] == ids(tok, long["text"], True)[:10]
    # an instruction whose prompt fills max_length has nothing to learn: dropped and counted
    long_prompt = {"instruction": "x " * 100, "output": "y"}
    enc = encode([long_prompt, {"instruction": "a", "output": "b"}], tok, "instruction", max_length=64)
    assert len(enc.examples) == 1 and enc.truncated == 1 and enc.dropped == 1
    with pytest.raises(DataError, match="none of the 1 records has a response token within max_length=8"):
        encode([long_prompt], tok, "instruction", max_length=8)


def test_encode_classification(tok):
    label_map = build_label_map(ROWS)
    enc = encode(ROWS, tok, "classification", max_length=3, label_map=label_map, task="classification")
    assert enc.examples == [
        {"input_ids": ids(tok, "good film", True), "label": 1},
        {"input_ids": ids(tok, "bad, slow film", True)[:3], "label": 0},
    ]
    assert enc.truncated == 1
    assert encode(ROWS, tok, "classification", max_length=8, task="classification").examples[0]["label"] == 1
    with pytest.raises(
        DataError,
        match=r"record 0: label 'neutral' was not seen in the training labels \['negative', 'positive'\]",
    ):
        encode(
            [{"text": "meh", "label": "neutral"}],
            tok,
            "classification",
            max_length=8,
            label_map=label_map,
            task="classification",
        )


def test_encode_classification_data_for_causal_lm_answers_the_label_word(tok):
    ex = encode(ROWS[:1], tok, "classification", max_length=128, label_map=build_label_map(ROWS)).examples[0]
    learned = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert learned == ids(tok, "positive") + [tok.eos_token_id]
    prompt = instruction_prompt(classification_as_instruction(ROWS)[0])  # lists both labels
    assert "one of: negative, positive." in prompt
    assert ex["input_ids"][: -len(learned)] == ids(tok, prompt, True)


def test_encode_bad_arguments(tok):
    with pytest.raises(ConfigError, match="needs data in the classification format"):
        encode([{"text": "a"}], tok, "completion", max_length=8, task="classification")
    with pytest.raises(ConfigError, match="unknown task"):
        encode([{"text": "a"}], tok, "completion", max_length=8, task="regression")
    with pytest.raises(ConfigError, match="max_length must be at least 2"):
        encode([{"text": "a"}], tok, "completion", max_length=1)
    with pytest.raises(DataError, match="the dataset is empty"):
        encode([], tok, "completion", max_length=8)
    with pytest.raises(
        DataError, match=r"record 1: null value in column 'output' needed by the instruction format"
    ):
        encode(
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}],
            tok,
            "instruction",
            max_length=8,
        )


def test_encode_chat_template_problems(tok):
    no_template = copy.copy(tok)
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        encode([{"messages": CHAT}], no_template, "chat", max_length=64)
    unstable = copy.copy(tok)  # renders the number of turns first, so prefixes differ
    unstable.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(
        DataError, match="record 0, turn 1: the chat template does not render this conversation turn by turn"
    ):
        encode([{"messages": CHAT}], unstable, "chat", max_length=64)
    failing = copy.copy(tok)
    failing.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(DataError, match="record 0: the tokenizer's chat template cannot render"):
        encode([{"messages": CHAT}], failing, "chat", max_length=64)


# ---------------------------------------------------------------- prompt/completion, seq2seq, token tags

PC = {"prompt": "The capital of France is", "completion": " Paris."}


def test_encode_prompt_completion_text_learns_the_completion_and_eos(tok):
    ex = encode([PC], tok, None, max_length=64).examples[0]  # detected as prompt-completion
    prompt = ids(tok, PC["prompt"], True)
    answer = ids(tok, PC["completion"]) + [tok.eos_token_id]
    assert ex == {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    # input-target pairs train a causal LM the same way
    pair = {"input": PC["prompt"], "target": PC["completion"]}
    assert encode([pair], tok, None, max_length=64).examples[0] == ex


def test_encode_prompt_completion_with_the_chat_template(tok):
    ex = encode([PC], tok, "prompt-completion", max_length=128, chat_template=True).examples[0]
    turns = [{"role": "user", "content": PC["prompt"]}, {"role": "assistant", "content": PC["completion"]}]
    assert ex["input_ids"] == ids(tok, tok.apply_chat_template(turns, tokenize=False))
    learned = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(learned) == PC["completion"] + "<|im_end|>"
    # the same as a chat record: the chat path decides what is learned
    assert encode([{"messages": turns}], tok, "chat", max_length=128).examples[0] == ex


def test_encode_conversational_prompt_completion_learns_only_the_completion(tok):
    record = {"prompt": CHAT[:3], "completion": CHAT[3:]}  # an assistant turn in the prompt too
    ex = encode([record], tok, None, max_length=256).examples[0]
    whole = encode([{"messages": CHAT}], tok, "chat", max_length=256).examples[0]
    assert ex["input_ids"] == whole["input_ids"]
    learned = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(learned) == "See you<|im_end|>"


def test_encode_prompt_completion_refusals(tok):
    with pytest.raises(DataError, match="mixes conversational"):
        encode([{"prompt": CHAT[:1], "completion": CHAT[1:2]}, PC], tok, None, max_length=64)
    with pytest.raises(DataError, match="completion has no assistant turn"):
        encode([{"prompt": CHAT[:2], "completion": CHAT[2:3]}], tok, None, max_length=64)
    with pytest.raises(DataError, match="column 'completion' must be a string"):
        encode([{"prompt": "a", "completion": ["b"]}], tok, None, max_length=64)
    with pytest.raises(ConfigError, match="seq2seq' takes plain-text"):
        encode([{"prompt": CHAT[:1], "completion": CHAT[1:2]}], tok, None, max_length=64, task="seq2seq")


def test_encode_seq2seq_targets_end_with_eos(tok):
    enc = encode([PC, {"prompt": "a b c d e", "completion": "x"}], tok, None, max_length=3, task="seq2seq")
    first = enc.examples[0]
    assert first["input_ids"] == ids(tok, PC["prompt"], True)[:3]
    assert first["target_ids"] == (ids(tok, PC["completion"], True) + [tok.eos_token_id])[:3]
    assert enc.examples[1]["target_ids"] == ids(tok, "x", True) + [tok.eos_token_id]
    assert enc.truncated == 2
    with pytest.raises(ConfigError, match="needs data in the input-target or prompt-completion"):
        encode([{"text": "a"}], tok, None, max_length=8, task="seq2seq")


@pytest.fixture(scope="module")
def bert_tok():
    from fixtures import minilm_tokenizer_folder
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_tokenizer_folder())


def test_encode_token_tags_labels_the_first_sub_token_of_each_word(bert_tok):
    record = {"tokens": ["Zwolleborg", "is", "huge"], "tags": ["B-LOC", "O", "O"]}
    ex = encode([record, NER[0]], bert_tok, None, max_length=64, task="token-classification").examples[0]
    pieces = [bert_tok.tokenize(w) for w in record["tokens"]]
    assert len(pieces[0]) > 1  # the test needs a word split in sub-tokens
    tag_map = build_tag_map([record, NER[0]])
    assert tag_map == {"O": 0, "B-LOC": 1, "B-PER": 2}
    expected = [IGNORE_INDEX]  # [CLS]
    for piece, tag in zip(pieces, record["tags"]):
        expected += [tag_map[tag]] + [IGNORE_INDEX] * (len(piece) - 1)
    assert ex["token_labels"] == expected + [IGNORE_INDEX]  # [SEP]
    assert ex["input_ids"] == bert_tok(" ".join(record["tokens"]))["input_ids"]


def test_token_tags_maps_and_refusals(bert_tok):
    assert build_tag_map([{"tokens": ["a", "b"], "ner_tags": [3, 0]}]) == {"0": 0, "3": 3}  # ints kept
    with pytest.raises(DataError, match="one tag per word"):
        encode(
            [{"tokens": ["a"], "tags": ["O", "O"]}], bert_tok, None, max_length=8, task="token-classification"
        )
    with pytest.raises(DataError, match="at least two different tags"):
        build_tag_map([{"tokens": ["a"], "tags": ["O"]}])
    with pytest.raises(DataError, match="tag 'B-ORG' was not seen"):
        encode(
            [{"tokens": ["a"], "tags": ["B-ORG"]}],
            bert_tok,
            None,
            max_length=8,
            task="token-classification",
            label_map={"O": 0, "B-PER": 1},
        )
    with pytest.raises(ConfigError, match="pass --task token-classification"):
        encode(NER, bert_tok, None, max_length=8)
