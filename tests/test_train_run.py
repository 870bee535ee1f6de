"""lorakit.train.run: whole runs on tiny models (classification, QLoRA, bad data), a SIGKILL then
--resume bitwise equal to an uninterrupted run, and torchrun with two processes equal to one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fixtures import tiny_run_folder

from lorakit.errors import ConfigError, DataError
from lorakit.train import resolve_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- whole runs (tiny models)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, and a small sentiment-like data file."""
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"))


def test_run_training_classification_trains_the_head_and_reloads(tiny_folder, tmp_path):
    from lorakit.train import run_training

    cfg = resolve_config(
        {},
        dict(
            model=str(tiny_folder / "model"),
            data=str(tiny_folder / "data.jsonl"),
            task="classification",
            output=str(tmp_path),
            max_steps=4,
            batch_size=4,
            eval_fraction=0.25,
            threads=1,
        ),
    )
    s = run_training(cfg)
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(s.final) and s.base
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (s.adapter / "train_config.yaml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    saved = json.loads((s.adapter / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["score"] and saved["task_type"] == "SEQ_CLS"
    # the saved adapter, loaded onto a fresh base, gives the trained head
    from safetensors.torch import load_file

    tensors = load_file(str(s.adapter / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in tensors


def test_run_training_refuses_bad_data_before_writing(tiny_folder, tmp_path):
    from lorakit.train import run_training

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    out = tmp_path / "out"
    with pytest.raises(DataError):
        run_training(
            resolve_config({}, dict(model=str(tiny_folder / "model"), data=str(bad), output=str(out)))
        )
    assert not out.exists()


def _tiny_run(tiny_folder, out, **kw):
    from lorakit.train import run_training

    settings = dict(
        model=str(tiny_folder / "model"),
        data=str(tiny_folder / "data.jsonl"),
        output=str(out),
        max_steps=2,
        batch_size=4,
        eval_fraction=0.25,
        eval_base=False,
        threads=1,
    )
    return run_training(resolve_config({}, {**settings, **kw}))


def test_integer_class_labels_keep_their_values(tiny_folder, tmp_path):
    """Labels 1 and 2 (no 0) need a 3-way head; the saved config names every id."""
    data = tmp_path / "ints.jsonl"
    rows = [json.loads(line) for line in (tiny_folder / "data.jsonl").read_text().splitlines()]
    data.write_text(
        "".join(json.dumps({"text": r["text"], "label": 1 + i % 2}) + "\n" for i, r in enumerate(rows))
    )
    s = _tiny_run(tiny_folder, tmp_path / "out", data=str(data), task="classification")
    assert {"eval_accuracy", "eval_macro_f1"} <= set(s.final)
    from safetensors.torch import load_file

    head = load_file(str(s.adapter / "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert head.shape[0] == 3


def test_a_second_run_into_the_same_output_is_refused_then_overwrites(tiny_folder, tmp_path):
    out = tmp_path / "out"
    _tiny_run(tiny_folder, out)
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        _tiny_run(tiny_folder, out, seed=1)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match=r"--resume: these settings differ .*--seed 0 -> 1"):
        _tiny_run(tiny_folder, out, seed=1, resume=True)
    _tiny_run(tiny_folder, out, seed=1, overwrite=True)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]


def test_layers_beyond_the_model_are_a_config_error_before_anything_is_written(tiny_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="99"):
        _tiny_run(tiny_folder, out, layers="99-100")
    assert not out.exists()


def test_run_training_into_a_file_is_refused(tiny_folder, tmp_path):
    f = tmp_path / "file"
    f.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        _tiny_run(tiny_folder, f)


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_run_training_qlora_on_a_4bit_base(tiny_folder, tmp_path, task):
    """--quantize nf4: the base's linear layers are 4-bit, the adapter trains and saves as usual."""
    from lorakit.hf import load_model
    from lorakit.quant import Linear4bit
    from lorakit.train import run_training

    model, _ = load_model(tiny_folder / "model", task=task, quantize="nf4")
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14  # 2 layers x (q, k, v, o, gate, up, down); head stays full precision
    cfg = resolve_config(
        {},
        dict(
            model=str(tiny_folder / "model"),
            data=str(tiny_folder / "data.jsonl"),
            task=task,
            output=str(tmp_path),
            max_steps=3,
            batch_size=4,
            eval_fraction=0.25,
            threads=1,
            quantize="nf4",
        ),
    )
    s = run_training(cfg)
    assert math.isfinite(s.final["eval_loss"]) and s.trainable > 0
    from safetensors.torch import load_file

    tensors = load_file(str(s.adapter / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.lora_A.weight") for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


# ----------------------------------------------------------------------------- processes: kill/resume, torchrun

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _train_cmd(tiny_folder, output, *extra: str) -> list[str]:
    return [
        "-m",
        "lorakit",
        "train",
        "--model",
        str(tiny_folder / "model"),
        "--data",
        str(tiny_folder / "data.jsonl"),
        "--output",
        str(output),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--lora-dropout",
        "0.1",
        "--threads",
        "1",
        "--no-eval-base",
        "--max-eval",
        "4",
        *extra,
    ]


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bitwise_equal(tiny_folder, tmp_path):
    """Dropout on, so the restored RNG state matters as much as the optimizer and data position."""
    import signal
    import subprocess
    import sys
    import time

    steps = ["--max-steps", "40", "--save-every", "5"]
    subprocess.run(
        [sys.executable, *_train_cmd(tiny_folder, tmp_path / "a", *steps)],
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
    )
    b = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, *_train_cmd(tiny_folder, b, *steps)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (b / "checkpoints" / "step-0000010" / "complete.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its second checkpoint"
        )
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (b / "checkpoints" / "step-0000040").exists() and not (b / "adapter").exists()
    done = subprocess.run(
        [sys.executable, *_train_cmd(tiny_folder, b, *steps, "--resume")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    want, got = _adapter(tmp_path / "a"), _adapter(b)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tiny_folder, tmp_path):
    """2 gloo processes, each taking half of every global batch of 4 == one process with batch 4."""
    import subprocess
    import sys

    # --lora-rank at its default (16): the flag must reach lorakit through torchrun's parser
    steps = ["--max-steps", "6", "--save-every", "0", "--lora-dropout", "0", "--lora-rank", "16"]
    subprocess.run(
        [sys.executable, *_train_cmd(tiny_folder, tmp_path / "one", *steps)],
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
    )
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *_train_cmd(tiny_folder, tmp_path / "two", *steps),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for name, value in one.items():
        # Adam divides by sqrt(v): near-zero gradients turn float rounding into ~1e-5 differences
        torch.testing.assert_close(two[name], value, rtol=1e-3, atol=5e-5)
    assert not torch.equal(one[next(k for k in one if "lora_B" in k)], torch.zeros(1))
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # rank 0 only


# ---------------------------------------------------------------- seq2seq and token classification


def _peft_logits(cls, model_folder, adapter, batch):
    """Logits of the base in `model_folder` with `adapter` loaded by PEFT (the reference reader)."""
    import peft

    base = cls.from_pretrained(model_folder)
    reloaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return reloaded(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_trains_evaluates_generates_and_loads_in_peft(family, tmp_path, capsys):
    import json

    from fixtures import tiny_seq2seq_model, write_jsonl
    from transformers import AutoModelForSeq2SeqLM

    from lorakit.cli import main
    from lorakit.generate import Row, Sampling, generate_seq2seq, load_for_inference

    folder = tiny_seq2seq_model(tmp_path / "model", family)
    words = ["cat", "dog", "sun", "moon"]
    data = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"input": f"say {w}", "target": w}) for w in words * 4]
    )
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--data", str(data), "--task", "seq2seq", "--output", str(out)]
    argv += [
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "2e-2",
        "--warmup-steps",
        "1",
        "--save-every",
        "0",
    ]
    assert main(argv + ["--eval-fraction", "0.25", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "eval_exact_match" in evals[-1]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    model, tok, name = load_for_inference(str(folder), [str(out / "adapter")])
    assert type(model).__name__.endswith("ForConditionalGeneration")
    batch = {
        "input_ids": torch.tensor([tok("say cat")["input_ids"]]),
        "decoder_input_ids": torch.tensor([[2, 5, 6]]),
    }
    with torch.no_grad():
        ours = model(**batch).logits
    torch.testing.assert_close(ours, _peft_logits(AutoModelForSeq2SeqLM, folder, out / "adapter", batch))
    # `lorakit generate` prints the decoder's greedy reply, the same as the evaluation's decoder
    row = Row(batch["input_ids"][0].tolist(), name, Sampling(max_tokens=12))
    reply = generate_seq2seq(model, [row], {tok.eos_token_id}, tok.pad_token_id)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--adapter",
                str(out / "adapter"),
                "--max-tokens",
                "12",
                "say cat",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == tok.decode(reply[0], skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_token_classification_trains_scores_entities_and_loads_in_peft(tmp_path):
    import json

    from fixtures import NER, tiny_bert_tagger, write_jsonl
    from transformers import AutoModelForTokenClassification

    from lorakit.train import TrainConfig, run_training

    folder = tiny_bert_tagger(tmp_path / "model")
    data = write_jsonl(tmp_path / "ner.jsonl", [json.dumps(r) for r in NER * 6])
    cfg = TrainConfig(
        model=str(folder),
        data=str(data),
        task="token-classification",
        output=str(tmp_path / "run"),
        max_steps=25,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        save_every=0,
        eval_fraction=0.25,
        threads=1,
    )
    s = run_training(cfg)
    assert s.final["eval_f1"] > s.base["eval_f1"] and s.final["eval_accuracy"] > s.base["eval_accuracy"]
    assert {"eval_precision", "eval_recall", "eval_f1_PER", "eval_f1_LOC"} <= set(s.final)
    config = json.loads((s.adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    from lorakit.hf import load_model
    from lorakit.io import load_adapter

    model, tok = load_model(folder, task="token-classification", num_labels=5)
    load_adapter(model, s.adapter)
    batch = tok(["John lives in Paris"], return_tensors="pt")
    with torch.no_grad():
        ours = model.eval()(**batch).logits
    import peft

    base = AutoModelForTokenClassification.from_pretrained(folder, num_labels=5)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, s.adapter).eval()(**batch).logits
    torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_add_tokens_trains_only_the_new_rows_and_generate_reads_them(tmp_path, capsys):
    from fixtures import tiny_chat_model, write_jsonl
    from safetensors.torch import load_file

    from lorakit.cli import main
    from lorakit.generate import load_for_inference

    folder = tiny_chat_model(tmp_path / "model")
    lines = [
        json.dumps({"prompt": f"call {w}", "completion": f" <tool>{w}</tool>"})
        for w in ["a", "b", "c", "d"] * 4
    ]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--output",
        str(out),
        "--add-tokens",
        "<tool>,</tool>",
    ]
    argv += [
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--save-every",
        "0",
        "--no-eval-base",
    ]
    assert main(argv + ["--eval-fraction", "0.25", "--threads", "1", "--target-modules", "q_proj"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    vocab = 49152
    assert config["trainable_token_indices"] == [vocab, vocab + 1]  # the two new ids
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (2, 32)  # two rows of the tied 32-wide embedding, not the whole matrix
    model, tok, _ = load_for_inference(str(folder), [str(out / "adapter")])
    assert len(tok) == vocab + 2 and model.get_input_embeddings().weight.shape[0] == vocab + 2
    torch.testing.assert_close(model.model.embed_tokens(torch.tensor([vocab, vocab + 1])), rows)
    assert tok("<tool>x</tool>", add_special_tokens=False)["input_ids"][0] == vocab


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("selective", [False, True])
def test_checkpointing_gives_the_same_gradient_bits_as_none(selective):
    from fixtures import lm_examples, lora4, pad_right, train_llama

    from lorakit.train import loss_sum
    from lorakit.train.run import enable_checkpointing

    def grads(checkpointed: bool):
        model = lora4(train_llama()).train()
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        if checkpointed:
            enable_checkpointing(model, selective=selective)
        loss_sum(model, pad_right(lm_examples(4))).backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b)


NEW_MARKERS_TEMPLATE = (
    "{% for m in messages %}{{ '<|turn|>' + m['role'] + '\\n' + m['content'] + '<|endturn|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn|>assistant\\n' }}{% endif %}"
)


@pytest.mark.slow
def test_a_chat_template_with_new_markers_adds_them_and_trains_only_their_rows(tmp_path):
    from fixtures import tiny_chat_model, write_jsonl
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lorakit.generate import load_for_inference
    from lorakit.train import TrainConfig, run_training

    folder = tiny_chat_model(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = NEW_MARKERS_TEMPLATE  # a user's own template, markers the vocabulary lacks
    tok.save_pretrained(folder)
    vocab = len(tok)
    assert "<|turn|>" not in tok.get_vocab()
    chats = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["a", "b", "c", "d"] * 2
    ]
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(c) for c in chats])
    cfg = TrainConfig(
        model=str(folder),
        data=str(data),
        output=str(tmp_path / "run"),
        max_steps=2,
        batch_size=4,
        warmup_steps=1,
        save_every=0,
        eval_fraction=0,
        eval_base=False,
        threads=1,
        target_modules="q_proj",
    )
    s = run_training(cfg)
    config = json.loads((s.adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == [vocab, vocab + 1]  # <|endturn|>, <|turn|> (sorted)
    saved = load_file(s.adapter / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (2, 32)
    model, tok2, _ = load_for_inference(str(folder), [str(s.adapter)])
    assert tok2.convert_tokens_to_ids(["<|endturn|>", "<|turn|>"]) == [vocab, vocab + 1]
    text = tok2.apply_chat_template(chats[0]["messages"], tokenize=False)
    assert tok2(text, add_special_tokens=False)["input_ids"][0] == vocab + 1  # one token, not split
    assert model.get_input_embeddings().weight.shape[0] == vocab + 2
