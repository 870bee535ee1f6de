"""lorakit.train: the loop against references (transformers' loss, one big batch, hand-computed
schedules and F1), checkpoints, config resolution, errors, and a whole run on tiny models."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import fixtures
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, DataError, ShapeMismatchError, TrainingError
from lorakit.train import TrainConfig, batch_plan, loss_sum, resolve_config, train
from lorakit.train.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.train.config import load_yaml
from lorakit.train.eval import generation_accuracy, macro_f1
from lorakit.train.loop import lr_lambda

transformers = pytest.importorskip("transformers")

IGN = -100


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: tiny models run fastest so, and CPU results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(vocab: int = 128, seed: int = 0, cls: type | None = None, **kw) -> nn.Module:
    """fixtures.tiny_llama, narrower (32 wide, 2 layers) so the training tests stay fast."""
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    return fixtures.tiny_llama(seed, cls or transformers.LlamaForCausalLM, vocab_size=vocab, **shape, **kw)


def lm_examples(n: int, seed: int = 0, vocab: int = 128) -> list[dict]:
    """Prompt + answer examples of varied lengths, the loss on the answer only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 12))]
        answer = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 3))]
        out.append({"input_ids": prompt + answer, "labels": [IGN] * len(prompt) + answer})
    return out


def collate(examples: list[dict], pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padding collate (the data layer's contract) for these tests."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]
    mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    else:
        batch["labels"] = torch.tensor([e["labels"] + [IGN] * (width - len(e["labels"])) for e in examples])
    return batch


def lora(model: nn.Module, **kw) -> nn.Module:
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = dict(
        data="unused",
        output=str(tmp_path),
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        save_every=0,
        log_every=1,
        eval_base=False,
    )
    return TrainConfig(**{**base, **kw}).validate()


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- loss vs transformers


def test_loss_sum_matches_transformers_causal_lm_loss():
    model = tiny_llama()
    examples = lm_examples(5)
    batch = collate(examples)
    count = sum(1 for e in examples for t in e["labels"][1:] if t != IGN)
    ours = loss_sum(model, batch) / count  # logits_to_keep: only the answer positions reach the head
    reference = model(**batch).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_loss_sum_matches_transformers_classification_loss():
    model = tiny_llama(cls=transformers.LlamaForSequenceClassification, num_labels=3, pad_token_id=0)
    examples = [{"input_ids": e["input_ids"], "label": i % 3} for i, e in enumerate(lm_examples(6))]
    batch = collate(examples)
    torch.testing.assert_close(loss_sum(model, batch) / 6, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_one_big_batch(tmp_path):
    """grad_accum=2 (micro-batches with different token counts) takes the same steps as one batch."""
    examples = lm_examples(16)
    results = []
    for accum in (1, 2):
        model = lora(tiny_llama())
        train(model, examples, cfg_for(tmp_path / str(accum), grad_accum=accum), collate)
        results.append(adapter_tensors(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in results[0].items() if "lora_B" in k)  # it did train


def test_loop_matches_a_plain_pytorch_loop(tmp_path):
    """Reference: AdamW steps on the same full batch with transformers' own loss."""
    examples = lm_examples(8)
    model = lora(tiny_llama())
    rows = train(
        model,
        examples,
        cfg_for(
            tmp_path,
            max_steps=5,
            batch_size=8,
            schedule="constant",
            warmup_steps=0,
            max_grad_norm=0,
            weight_decay=0.01,
        ),
        collate,
    )
    ref = lora(tiny_llama())
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    batch = collate(examples)
    losses = []
    for _ in range(5):
        loss = ref(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-4)
    ours = adapter_tensors(model)
    for name, value in adapter_tensors(ref).items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- data order, schedule


def test_batch_plan_is_seeded_covers_every_example_and_groups_lengths():
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    plan = batch_plan(lengths, 8, seed=3, epoch=0)
    assert plan == batch_plan(lengths, 8, seed=3, epoch=0)
    assert plan != batch_plan(lengths, 8, seed=3, epoch=1)
    flat = [i for b in plan for i in b]
    assert len(flat) == 96 and len(set(flat)) == 96 and all(len(b) == 8 for b in plan)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan) / len(plan)
    assert spread < 30  # random batches of 8 would spread ~75
    with pytest.raises(DataError, match="only 3 training examples for a batch of 8"):
        batch_plan([1, 2, 3], 8, seed=0, epoch=0)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (
            "cosine",
            [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 8)), 0.5 * (1 + math.cos(math.pi * 7 / 8))],
        ),
        ("linear", [1 / 3, 2 / 3, 1.0, 7 / 8, 1 / 8]),
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule_warmup_then_decay(schedule, expected):
    f = lr_lambda(TrainConfig(schedule=schedule, warmup_steps=2), total=10)
    assert [f(s) for s in (0, 1, 2, 3, 9)] == pytest.approx(expected)


# ----------------------------------------------------------------------------- checkpoints


def _optimizer_and_scheduler(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_checkpoints_keep_last_k_and_ignore_half_written(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    (tmp_path / "step-0000009").mkdir()  # killed before its marker: not complete
    (tmp_path / ".step-0000010.tmp-123").mkdir()  # killed mid-write
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    assert (tmp_path / "step-0000003" / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_restores_params_optimizer_and_rng(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    batch = collate(lm_examples(4))
    loss_sum(model, batch).backward()
    opt.step()
    saved = adapter_tensors(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1, "epoch": 0, "position": 1, "tokens": 9})
    expected_draw = (torch.rand(3), random.random())
    other = lora(tiny_llama(seed=1))
    opt2, sched2 = _optimizer_and_scheduler(other)
    progress = load_checkpoint(latest_checkpoint(tmp_path), other, opt2, sched2)
    assert progress["position"] == 1
    assert (torch.rand(3), random.random())[1] == expected_draw[1]
    for name, value in adapter_tensors(other).items():
        assert torch.equal(value, saved[name])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    other = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt2, sched2 = _optimizer_and_scheduler(other)
    with pytest.raises(ShapeMismatchError, match="other trainable parameters"):
        load_checkpoint(latest_checkpoint(tmp_path), other, opt2, sched2)


class _Toy(nn.Module):
    """A non-transformers model: returns logits only; goes NaN from its `nan_from`-th call on."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, 16)
        self.head = nn.Linear(16, 128)
        self.calls, self.nan_from = 0, nan_from

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        logits = self.head(self.emb(input_ids))
        return SimpleNamespace(logits=logits * float("nan") if self.calls >= self.nan_from else logits)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    model = _Toy(nan_from=4)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 4") as err:
        train(model, lm_examples(16), cfg_for(tmp_path, max_steps=6, save_every=2), collate)
    assert "last good checkpoint is kept" in str(err.value)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000002"


def test_gradient_checkpointing_and_bf16_autocast_against_plain_fp32(tmp_path):
    """Checkpointing recomputes the same math (equal to float tolerance); bf16 autocast stays close."""
    examples = lm_examples(8)
    runs = {}
    for name, kw in {"plain": {}, "ckpt": {}, "bf16": {"precision": "bf16"}}.items():
        model = lora(tiny_llama())
        if name == "ckpt":
            from lorakit.train.run import enable_checkpointing

            enable_checkpointing(model)
        rows = train(model, examples, cfg_for(tmp_path / name, max_steps=3, **kw), collate)
        runs[name] = ([r["loss"] for r in rows], adapter_tensors(model))
    assert runs["ckpt"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    for key, value in runs["plain"][1].items():
        torch.testing.assert_close(runs["ckpt"][1][key], value, rtol=1e-4, atol=1e-5)
    assert runs["bf16"][0] == pytest.approx(runs["plain"][0], rel=3e-2)


def test_trim_heap_changes_no_numbers(tmp_path):
    """`--trim-heap` only gives freed memory back to the OS: the same losses and adapter, bitwise."""
    examples = lm_examples(8)
    runs = []
    for trim in (False, True):
        model = lora(tiny_llama())
        rows = train(model, examples, cfg_for(tmp_path / str(trim), max_steps=3, trim_heap=trim), collate)
        runs.append(([r["loss"] for r in rows], adapter_tensors(model)))
        assert not any(layer._forward_hooks for layer in model.model.layers)  # hooks removed after
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert torch.equal(runs[1][1][key], value), key


def test_time_budget_stops_early_and_still_saves_the_last_step(tmp_path):
    model = lora(tiny_llama())
    rows = train(model, lm_examples(16), cfg_for(tmp_path, max_steps=50, max_minutes=1e-9), collate)
    assert rows[-1]["step"] == 1
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000001"


# ----------------------------------------------------------------------------- eval metrics


def test_macro_f1_matches_hand_computation():
    golds = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: tp2 fp0 fn1 -> 0.8; class 1: tp1 fp1 fn1 -> 0.5; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


class _Tok:
    eos_token_id, pad_token_id = 0, 0
    words = {5: " positive", 6: " negative", 7: ".", 8: " it is"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words.get(int(i), "") for i in ids if not (skip_special_tokens and int(i) == 0))


class _Gen(nn.Module):
    """generate() appends a fixed answer per prompt (keyed by its last token); checks left padding."""

    answers = {10: [5, 7, 0], 11: [5, 0, 0], 12: [6, 0, 0], 13: [8, 6, 7]}

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert (attention_mask[:, -1] == 1).all()  # left-padded: every prompt ends at the right edge
        new = torch.tensor([self.answers[int(row[-1])][:3] for row in input_ids])
        first = torch.zeros(len(input_ids), 16)
        first[:, 5] = 1.0  # the first position always prefers " positive" over " negative"
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), scores=[first])


def test_generation_accuracy_exact_match_after_normalizing():
    examples = [
        {"input_ids": [3, 10, 5, 0], "labels": [IGN, IGN, 5, 0]},  # " positive." vs " positive": match
        {"input_ids": [3, 4, 11, 6, 0], "labels": [IGN, IGN, IGN, 6, 0]},  # positive vs negative: wrong
        {"input_ids": [12, 6, 0], "labels": [IGN, 6, 0]},  # match
        {"input_ids": [13, 6, 0], "labels": [IGN, 6, 0]},  # " it is negative.": a label match only
    ]
    scores = generation_accuracy(_Gen(), _Tok(), examples, batch_size=2)
    assert scores == pytest.approx(
        {"eval_exact_match": 2 / 4, "eval_label_match": 3 / 4, "eval_choice_accuracy": 1 / 4}
    )


# ----------------------------------------------------------------------------- config


def test_yaml_values_then_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nmax-steps: 7\nr: 4\ndata: d.jsonl\n")
    cfg = resolve_config(load_yaml(path), {"r": 8})
    assert (cfg.lr, cfg.max_steps, cfg.r, cfg.data) == (1e-3, 7, 8, "d.jsonl")
    assert resolve_config({}, {}).max_steps == 60  # no data: the demo preset
    assert resolve_config({}, {"data": "x"}).max_steps is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1\n", "not valid YAML"),
        ("learning_rate: 1\n", "unknown setting 'learning_rate'"),
        ("lr: fast\n", "lr must be a number"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"task": "regression"}, "task must be one of"),
        ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
        ({"layers": "1-x"}, "layers must look like"),
        ({"quantize": "int3"}, "quantize must be one of"),
    ],
)
def test_bad_settings_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({}, flags)


def test_cli_help_documents_every_setting(capsys):
    from lorakit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--config" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: cannot read it"),
        (["--task", "regression"], "task must be one of"),
        (["--batch-size", "6", "--grad-accum", "4"], "multiple of grad_accum"),
    ],
)
def test_cli_reports_bad_settings_without_a_traceback(capsys, tmp_path, argv, message):
    from lorakit.cli import main

    assert main(["train", "--output", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error:") and message in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- whole runs (tiny models)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, and a small sentiment-like data file."""
    from lorakit.hf import load_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=49152, tie_word_embeddings=True).save_pretrained(root / "model")
    load_tokenizer("smollm2-135m").save_pretrained(root / "model")
    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "dull"]
    with open(root / "data.jsonl", "w") as f:
        for _ in range(40):
            w = [rng.choice(words) for _ in range(rng.randint(2, 6))]
            label = "positive" if w[0] in ("good", "great", "fine") else "negative"
            f.write(json.dumps({"text": " ".join(w), "label": label}) + "\n")
    return root


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

    steps = ["--max-steps", "6", "--save-every", "0", "--lora-dropout", "0"]
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
