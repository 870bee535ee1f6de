"""lorakit.commands.data (`lorakit data`): the report and its errors."""

from __future__ import annotations

import json

from fixtures import CHAT, write_jsonl
from fixtures import chat_expectation as _chat_expectation
from fixtures import token_ids as ids

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


def test_cli_data_reports_prompt_completion_seq2seq_and_token_tags(tmp_path, capsys, tok):
    from fixtures import NER, minilm_tokenizer_folder

    from lorakit.cli import main

    p = write_jsonl(tmp_path / "pc.jsonl", [json.dumps({"prompt": "2+2=", "completion": " 4"})])
    assert main(["data", str(p)]) == 0
    out = capsys.readouterr().out
    assert "format:    prompt-completion (columns: prompt, completion)" in out
    assert "2+2=[[ 4<|im_end|>]]" in out
    assert main(["data", str(p), "--chat-template"]) == 0
    assert (
        "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n[[ 4<|im_end|>]]" in capsys.readouterr().out
    )
    assert main(["data", str(p), "--task", "seq2seq"]) == 0
    assert "2+2=\n=> target [[ 4<|im_end|>]]" in capsys.readouterr().out
    ner = write_jsonl(tmp_path / "ner.jsonl", [json.dumps(r) for r in NER])
    bert = str(minilm_tokenizer_folder())
    assert main(["data", str(ner), "--task", "token-classification", "--model", bert]) == 0
    out = capsys.readouterr().out
    assert "format:    token-tags (columns: tokens, tags)" in out
    assert "tags:      O=0, B-LOC=1, B-PER=2, I-LOC=3, I-PER=4" in out
    assert "[CLS] john/B-PER lives/O in/O paris/B-LOC [SEP]" in out
