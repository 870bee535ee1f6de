"""lorakit.train.loop: the loss against transformers', accumulation and a plain PyTorch loop as
references, the data order, the schedule by hand, non-finite losses, precision and time budget."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from fixtures import lm_examples
from fixtures import lora4 as lora
from fixtures import pad_right as collate
from fixtures import train_cfg as cfg_for
from fixtures import train_llama as tiny_llama
from fixtures import trainable_tensors as adapter_tensors
from torch import nn

from lorakit.errors import DataError, TrainingError
from lorakit.tasks import IGNORE_INDEX
from lorakit.train import TrainConfig, batch_plan, loss_sum, train
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.loop import count_targets, lr_lambda

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- loss vs transformers


def test_loss_sum_matches_transformers_causal_lm_loss():
    model = tiny_llama()
    examples = lm_examples(5)
    batch = collate(examples)
    count = sum(1 for e in examples for t in e["labels"][1:] if t != IGNORE_INDEX)
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


def test_resume_with_a_new_lr_applies_it_to_the_optimizer_and_schedule(tmp_path):
    """Steps 5-6 after resuming with lr 5e-3 use the lr a run started with 5e-3 has at those steps
    (the checkpoint holds the old peak lr in the optimizer and the scheduler)."""
    examples = lm_examples(16)
    model = lora(tiny_llama())
    train(model, examples, cfg_for(tmp_path / "a", max_steps=4, save_every=2), collate)
    resumed = train(model, examples, cfg_for(tmp_path / "a", max_steps=6, lr=5e-3, resume=True), collate)
    fresh = train(lora(tiny_llama()), examples, cfg_for(tmp_path / "b", max_steps=6, lr=5e-3), collate)
    assert [r["step"] for r in resumed] == [5, 6]
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in fresh[4:]], rel=1e-12)
    f = lr_lambda(cfg_for(tmp_path, max_steps=6), 6)
    assert [r["lr"] for r in resumed] == pytest.approx([5e-3 * f(5), 5e-3 * f(6)], rel=1e-12)


# ---------------------------------------------------------------- seq2seq and token classification


def _tiny_task_model(kind: str):
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertForTokenClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "t5":
        return T5ForConditionalGeneration(
            T5Config(
                vocab_size=100,
                d_model=16,
                d_kv=4,
                d_ff=32,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
            )
        )
    if kind == "bart":
        cfg = BartConfig(
            vocab_size=100,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
        )
        return BartForConditionalGeneration(cfg)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    return BertForTokenClassification(cfg)


@pytest.mark.parametrize("kind", ["t5", "bart", "bert"])
def test_loss_sum_of_seq2seq_and_tagging_is_transformers_mean_loss_times_the_count(kind):
    from lorakit.data import collate
    from lorakit.tasks import model_task

    model = _tiny_task_model(kind).eval()
    key = "token_labels" if kind == "bert" else "target_ids"
    examples = [
        {"input_ids": [5, 6, 7, 8], key: [1, IGNORE_INDEX, 3, 4] if kind == "bert" else [9, 10, 2]},
        {"input_ids": [11, 12], key: [2, 0] if kind == "bert" else [13, 2]},
    ]
    batch = collate(examples, pad_token_id=1)
    assert model_task(model) == ("token-classification" if kind == "bert" else "seq2seq")
    count = sum(count_targets(e) for e in examples)
    assert count == 5  # every target token, every tagged token
    with torch.no_grad():
        ours = loss_sum(model, batch)
        reference = model(**batch).loss * count  # transformers' own loss: the mean over labelled tokens
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
