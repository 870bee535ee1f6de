"""lorakit.data.preference: preference pairs and KTO records (plain text and chat), truncation (the
prompt first), skipped and refused records, the shared-prompt batch layout, and `lorakit data`."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import token_ids, write_jsonl

from lorakit.data.preference import collate_pairs, encode_preference, preference_format, with_kl_completions
from lorakit.errors import DataError

PAIR = {"prompt": "Is this review positive? Great fun.", "chosen": " yes", "rejected": " no, not at all"}


def test_plain_pair_shares_the_prompt_and_ends_each_completion_with_eos(tok):
    enc = encode_preference([PAIR], tok, "preference", max_length=64)
    (ex,) = enc.examples
    prompt = token_ids(tok, PAIR["prompt"], special=True)
    chosen = token_ids(tok, PAIR["prompt"] + PAIR["chosen"], special=True)[len(prompt) :] + [tok.eos_token_id]
    rejected = token_ids(tok, PAIR["prompt"] + PAIR["rejected"], special=True)[len(prompt) :] + [
        tok.eos_token_id
    ]
    assert ex["input_ids"] == prompt + chosen + rejected
    assert (ex["prompt_len"], ex["chosen_len"], ex["rejected_len"]) == (
        len(prompt),
        len(chosen),
        len(rejected),
    )


def test_chat_pair_uses_the_chat_template(tok):
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    (ex,) = encode_preference([record], tok, "preference", max_length=128).examples
    prompt = tok.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    p, c = ex["prompt_len"], ex["chosen_len"]
    assert tok.decode(ex["input_ids"][:p]) == prompt
    assert tok.decode(ex["input_ids"][p : p + c]).startswith("Hello<|im_end|>")
    assert tok.decode(ex["input_ids"][p + c :]).startswith("Go away<|im_end|>")


def test_a_long_prompt_is_cut_from_the_left_and_counted(tok, caplog):
    long = {**PAIR, "prompt": "word " * 80 + "Is it positive?"}
    with caplog.at_level("WARNING", logger="lorakit"):
        enc = encode_preference([long, PAIR], tok, "preference", max_length=24)
    assert "1 prompts cut from the left and 0 completions cut to fit max_length=24" in caplog.text
    ex = enc.examples[0]
    assert (enc.prompt_truncated, enc.completion_truncated) == (1, 0)
    assert ex["prompt_len"] + max(ex["chosen_len"], ex["rejected_len"]) == 24
    assert tok.decode(ex["input_ids"][: ex["prompt_len"]]).endswith("Is it positive?")  # the end stays
    assert tok.decode(ex["input_ids"][ex["prompt_len"] + ex["chosen_len"] :]).startswith(" no, not at all")


def test_completions_longer_than_max_length_are_cut_after_the_prompt(tok):
    enc = encode_preference([{**PAIR, "rejected": " no" * 40}], tok, "preference", max_length=16)
    ex = enc.examples[0]
    assert (
        enc.completion_truncated == 1 and ex["prompt_len"] == 1
    )  # one prompt token predicts the first answer token
    assert ex["rejected_len"] == 15 and ex["chosen_len"] <= 15


def test_identical_pairs_are_skipped_and_counted_and_none_left_is_an_error(tok, caplog):
    same = {**PAIR, "rejected": PAIR["chosen"]}
    with caplog.at_level("WARNING", logger="lorakit"):
        enc = encode_preference([PAIR, same], tok, "preference", max_length=64)
    assert len(enc.examples) == 1 and enc.identical == 1
    assert "1 of 2 pairs have identical chosen and rejected answers and were skipped" in caplog.text
    with pytest.raises(DataError, match="none of the 1 preference records is usable"):
        encode_preference([same], tok, "preference", max_length=64)


@pytest.mark.parametrize(
    "record,fmt,message",
    [
        (
            {"prompt": "x", "chosen": "y"},
            "preference",
            r"record 0: missing column 'rejected'.*columns present: \['chosen', 'prompt'\]",
        ),
        (
            {"prompt": "x", "rejected": "z"},
            "preference",
            r"record 0: missing column 'chosen'.*columns present: \['prompt', 'rejected'\]",
        ),
        (
            {"prompt": "x", "chosen": "y", "rejected": ["z"]},
            "preference",
            "'rejected' must be text like the prompt",
        ),
        ({"prompt": "x", "completion": "y", "label": "yes"}, "kto", "must be true .* or false"),
        ({"prompt": "", "chosen": "y", "rejected": "z"}, "preference", "record 0: the prompt has no tokens"),
    ],
)
def test_bad_records_are_errors_that_name_them(tok, record, fmt, message):
    with pytest.raises(DataError, match=message):
        encode_preference([record], tok, fmt, max_length=64)


def test_kto_needs_both_label_classes(tok):
    good = [
        {"prompt": "Q", "completion": " a", "label": True},
        {"prompt": "R", "completion": " b", "label": True},
    ]
    with pytest.raises(DataError, match="2 desirable and 0 undesirable"):
        encode_preference(good, tok, "kto", max_length=64)
    enc = encode_preference(
        [*good, {"prompt": "S", "completion": " c", "label": False}], tok, "kto", max_length=64
    )
    assert (enc.desirable, enc.undesirable) == (2, 1)
    assert (
        preference_format(good) == "kto" and preference_format([{"prompt": "p", "completion": "c"}]) is None
    )


def test_collate_lays_out_both_completions_after_one_prompt():
    ex = {"input_ids": [5, 6, 7, 8, 9, 10], "prompt_len": 2, "chosen_len": 2, "rejected_len": 2}
    short = {"input_ids": [5, 11, 12], "prompt_len": 1, "chosen_len": 1, "rejected_len": 1}
    batch = collate_pairs([ex, short], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 11, 12, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 3]  # rejected restarts after the prompt
    allowed = (batch["attention_mask"][0, 0] == 0).int()
    assert allowed[4].tolist() == [1, 1, 0, 0, 1, 0]  # the first rejected token: prompt and itself
    assert allowed[3].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["first_src"].tolist() == [[1, 2], [0, -1]] and batch["first_tgt"].tolist() == [
        [7, 8],
        [11, -1],
    ]
    assert batch["second_src"].tolist() == [[1, 4], [0, -1]] and batch["second_tgt"].tolist() == [
        [9, 10],
        [12, -1],
    ]
    assert torch.isfinite(batch["attention_mask"]).all()


def test_kl_completions_rotate_within_the_batch():
    exs = [{"input_ids": [1, 2, 3], "prompt_len": 1, "completion_len": 2, "desirable": True},
           {"input_ids": [4, 5], "prompt_len": 1, "completion_len": 1, "desirable": False}]  # fmt: skip
    assert [e["kl_ids"] for e in with_kl_completions(exs)] == [[5], [2, 3]]
    batch = collate_pairs(with_kl_completions(exs), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5], [4, 5, 2, 3]] and batch["desirable"].tolist() == [
        True,
        False,
    ]


def test_cli_data_reports_pairs_truncation_and_skips(tmp_path, capsys):
    from lorakit.cli import main

    rows = [PAIR, {**PAIR, "rejected": PAIR["chosen"]}, {**PAIR, "prompt": "long " * 60}]
    p = write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(r) for r in rows])
    assert main(["data", str(p), "--max-length", "32"]) == 0
    out = capsys.readouterr().out
    assert "format:    preference (columns: prompt, chosen, rejected; train with --method dpo" in out
    assert "pairs:     2 kept, 1 skipped (chosen identical to rejected)" in out
    assert "truncated: 1 prompts cut from the left, 0 completions cut" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "x", "chosen": "y"})])
    assert main(["data", str(bad)]) == 1
    assert "record 0: missing column 'rejected'" in capsys.readouterr().err
