"""Preference objectives (lorakit/train/preference.py) against TRL 1.16 on the same tiny model, adapter
weights and batch: TRL's own trainers tokenize the text, run their forward (the reference through PEFT's
disabled adapter or its frozen "ref" copy) and compute the loss; lorakit does the same from its own
encoding, layout and reference. Loss, gradient of every LoRA tensor and the logged rewards must agree."""

import copy
import math

import pytest
import torch
from fixtures import tiny_llama

import lorakit
from lorakit.data.preference import collate_pairs, encode_preference, with_kl_completions
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.preference import (
    REF_ADAPTER,
    MetricSums,
    completion_logps,
    dpo_loss,
    preference_loss_sum,
)

pytest.importorskip("trl")
pytest.importorskip("peft")

PAIRS = [
    {"prompt": "The film was", "chosen": " wonderful and moving.", "rejected": " dull."},
    {
        "prompt": "Review: a slow, tedious mess. Sentiment:",
        "chosen": " negative",
        "rejected": " positive, very positive",
    },
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5, or maybe 6"},
]
CHAT_PAIRS = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }
    for r in PAIRS
]
UNPAIRED = [
    {"prompt": "The film was", "completion": " wonderful.", "label": True},
    {"prompt": "Q: 2+2?", "completion": " 5", "label": False},
    {"prompt": "Review: tedious. Sentiment:", "completion": " negative", "label": True},
    {"prompt": "Best pizza topping?", "completion": " glue", "label": False},
]


@pytest.fixture(scope="module")
def base(tok):
    return tiny_llama(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def _lorakit(base, seed=0):
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _peft_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def _copy_into_peft(peft_model, model):
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".default." in name:
                p.copy_(ours[name.removeprefix("base_model.model.")])


def _grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_grads(ours, theirs):
    assert set(ours) == set(theirs) and ours
    for name, g in ours.items():
        assert torch.linalg.norm(g - theirs[name]) <= 1e-5 * torch.linalg.norm(theirs[name]) + 1e-9, name


def _close(a, b, scale=None):
    """a == b to 1e-5 relative; a difference of log-probs (a reward) relative to the log-probs' `scale`."""
    assert abs(a - b) <= 1e-5 * max(abs(b), scale or 0) + 1e-7, (a, b)


def _lorakit_step(model, records, fmt, tok, **settings):
    cfg = TrainConfig(data="x", **settings).validate()
    examples = encode_preference(records, tok, fmt, max_length=128).examples
    if fmt == "kto":
        examples = with_kl_completions(examples)
    sums = MetricSums(cfg.method)
    loss = preference_loss_sum(model, collate_pairs(examples, tok.pad_token_id), cfg, sums) / len(examples)
    loss.backward()
    return loss.item(), sums.means(reduce=False), examples


def _trl_dpo(peft_model_or_base, records, tok, tmp_path, peft_config=None, **args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(records),
        report_to=[],
        use_cpu=True,
        **args,
    )
    return DPOTrainer(
        model=peft_model_or_base,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tok,
        peft_config=peft_config,
    )


def _trl_loss(trainer, n):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


CASES = [
    ("sigmoid", 0.0, {"loss_type": ["sigmoid"]}),
    ("ipo", 0.0, {"loss_type": ["ipo"]}),
    ("hinge", 0.0, {"loss_type": ["hinge"]}),
    # TRL 1.16 has no conservative DPO; with A = -logsig(bd), B = -logsig(-bd) its "robust" loss is
    # ((1-e) A - e B) / (1-2e), so (1-e) A + e B = 2(1-e) sigmoid - (1-2e) robust
    (
        "sigmoid",
        0.2,
        {"loss_type": ["sigmoid", "robust"], "loss_weights": [1.6, -0.6], "label_smoothing": 0.2},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,smoothing,trl_args", CASES, ids=["sigmoid", "ipo", "hinge", "cdpo"])
def test_dpo_matches_trl_reference_from_disabled_adapter(base, tok, tmp_path, loss_type, smoothing, trl_args):
    trainer = _trl_dpo(
        copy.deepcopy(base), PAIRS, tok, tmp_path, peft_config=_peft_config(), beta=0.2, **trl_args
    )
    model = _lorakit(base)
    _copy_into_peft(trainer.model, model)
    theirs, metrics = _trl_loss(trainer, len(PAIRS))
    ours, our_metrics, _ = _lorakit_step(
        model,
        PAIRS,
        "preference",
        tok,
        method="dpo",
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=smoothing,
    )
    _close(ours, theirs)
    scale = 0.2 * abs(metrics["logps/chosen"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        _close(our_metrics[key], metrics[key], scale)
    _close(our_metrics["rewards/accuracies"], metrics["rewards/accuracies"])
    _check_grads(_grads(model), _grads(trainer.model, "base_model.model."))


@pytest.mark.slow
def test_dpo_chat_pairs_and_ref_adapter_match_trl(base, tok, tmp_path):
    """Chat messages (TRL's conversational format) and the reference from a frozen copy of the starting
    adapter (TRL's "ref" adapter for a PeftModel, lorakit's --ref-adapter)."""
    from peft import PeftModel

    start = _lorakit(base, seed=1)
    lorakit.save_adapter(start, tmp_path / "start")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "start", is_trainable=True)
    trainer = _trl_dpo(peft_model, CHAT_PAIRS, tok, tmp_path, beta=0.5)
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "start")
    lorakit.load_adapter(model, tmp_path / "start", adapter=REF_ADAPTER)
    lorakit.set_adapter(model, "default")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the policy away from its reference, the same way in both
        for name, p in model.named_parameters():
            if p.requires_grad:
                step = torch.randn(p.shape, generator=g) * 0.1
                p.add_(step)
                trainer.model.get_parameter("base_model.model." + name).add_(step)
    theirs, metrics = _trl_loss(trainer, len(CHAT_PAIRS))
    ours, our_metrics, examples = _lorakit_step(model, CHAT_PAIRS, "preference", tok, method="dpo", beta=0.5)
    for ex, row in zip(examples, trainer.train_dataset):  # the same tokens, the chat template applied alike
        p, c = ex["prompt_len"], ex["chosen_len"]
        assert (ex["input_ids"][:p], ex["input_ids"][p : p + c], ex["input_ids"][p + c :]) == (
            row["prompt_ids"],
            row["chosen_ids"],
            row["rejected_ids"],
        )
    _close(ours, theirs)
    _close(our_metrics["rewards/margins"], metrics["rewards/margins"], 0.5 * abs(metrics["logps/chosen"]))
    _check_grads(_grads(model), _grads(trainer.model, "base_model.model."))


def _trl_pair_batch(examples):
    """TRL's ORPO/CPO batch format (chosen_*/rejected_* rows, labels -100 on the prompt) from ours."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = []
        for ex in examples:
            p, c = ex["prompt_len"], ex["chosen_len"]
            answer = ex["input_ids"][p : p + c] if side == "chosen" else ex["input_ids"][p + c :]
            rows.append((ex["input_ids"][:p] + answer, [-100] * p + answer))
        width = max(len(ids) for ids, _ in rows)
        batch[f"{side}_input_ids"] = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        batch[f"{side}_attention_mask"] = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
        )
        batch[f"{side}_labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return batch


def _reference_free(trainer_cls, config_cls, model, tok, tmp_path, **args):
    from datasets import Dataset

    config = config_cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=128, **args)
    return trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(PAIRS), processing_class=tok)


@pytest.mark.slow
def test_simpo_matches_trl_cpo_trainer(base, tok, tmp_path):
    from peft import get_peft_model
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model = _lorakit(base)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config())
    _copy_into_peft(peft_model, model)
    trainer = _reference_free(
        CPOTrainer,
        CPOConfig,
        peft_model,
        tok,
        tmp_path,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
    )
    ours, our_metrics, examples = _lorakit_step(
        model, PAIRS, "preference", tok, method="simpo", beta=2.0, simpo_gamma=0.7
    )
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _trl_pair_batch(examples))
    loss.backward()
    _close(ours, loss.item())
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        _close(our_metrics[key], metrics[key])
    _check_grads(_grads(model), _grads(trainer.model, "base_model.model."))


@pytest.mark.slow
def test_orpo_matches_trl_odds_ratio_term_and_paper_nll(base, tok, tmp_path):
    """TRL's ORPO loss is its NLL (over prompt and response tokens) minus the odds-ratio term; lorakit's
    NLL is the paper's, on the chosen response. The odds-ratio terms and their gradients must be equal,
    and lorakit's NLL is the mean chosen-token log-prob computed by hand."""
    from peft import get_peft_model
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _lorakit(base)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config())
    _copy_into_peft(peft_model, model)
    trainer = _reference_free(ORPOTrainer, ORPOConfig, peft_model, tok, tmp_path, beta=0.3)
    ours, our_metrics, examples = _lorakit_step(
        model, PAIRS, "preference", tok, method="orpo", orpo_lambda=0.3
    )
    batch = _trl_pair_batch(examples)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    ratio_term = loss - metrics["nll_loss"]  # the NLL term's value; its gradient is removed below
    _, _, chosen_logits, _, nll = trainer.concatenated_forward(trainer.model, batch)
    labels = batch["chosen_labels"][:, 1:]
    logps = torch.log_softmax(chosen_logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    paper_nll = -((logps * (labels != -100)).sum(1) / (labels != -100).sum(1)).mean()
    (ratio_term - nll + nll.detach() + paper_nll).backward()
    _close(ours, ratio_term.item() + paper_nll.item())
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        _close(our_metrics[key], metrics[key])
    _check_grads(_grads(model), _grads(trainer.model, "base_model.model."))


@pytest.mark.slow
def test_kto_matches_trl_with_its_kl_estimate(base, tok, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    config = KTOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(UNPAIRED),
        report_to=[],
        use_cpu=True,
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.8,
        train_sampling_strategy="sequential",
    )
    trainer = KTOTrainer(
        model=copy.deepcopy(base),
        args=config,
        train_dataset=Dataset.from_list(UNPAIRED),
        processing_class=tok,
        peft_config=_peft_config(),
    )
    model = _lorakit(base, seed=2)  # weights whose KL estimate is positive (not clamped to 0)
    _copy_into_peft(trainer.model, model)
    theirs, metrics = _trl_loss(trainer, len(UNPAIRED))
    ours, our_metrics, _ = _lorakit_step(
        model,
        UNPAIRED,
        "kto",
        tok,
        method="kto",
        beta=0.3,
        kto_desirable_weight=1.3,
        kto_undesirable_weight=0.8,
    )
    _close(ours, theirs)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        _close(our_metrics[key], metrics[key], 0.3 * abs(metrics["logps/chosen"]))
    assert metrics["kl"] > 0  # the KL term is live (not clamped away), so its value was compared
    _check_grads(_grads(model), _grads(trainer.model, "base_model.model."))


def test_shared_prompt_layout_equals_separate_sequences(base, tok):
    """One forward over prompt + chosen + rejected (rejected blind to chosen) scores each completion as
    its own prompt + completion sequence does."""
    model = _lorakit(base)
    examples = encode_preference(PAIRS, tok, "preference", max_length=128).examples
    got = completion_logps(model, collate_pairs(examples, tok.pad_token_id))
    for i, ex in enumerate(examples):
        p, c = ex["prompt_len"], ex["chosen_len"]
        ids = ex["input_ids"]
        for key, seq, start in (("first", ids[: p + c], p), ("second", ids[:p] + ids[p + c :], p)):
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            want = (
                torch.log_softmax(logits[start - 1 : -1], -1)
                .gather(1, torch.tensor(seq[start:])[:, None])
                .sum()
            )
            _close(got[key][i].item(), want.item())


def test_dpo_loss_by_hand():
    c, r, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    d = 0.1 * ((c - rc) - (r - rr))  # 0.1 * (1 + 0.5)
    assert math.isclose(dpo_loss(c, r, rc, rr, beta=0.1).item(), math.log1p(math.exp(-0.15)), rel_tol=1e-6)
    assert math.isclose(
        dpo_loss(c, r, rc, rr, beta=0.1, loss_type="hinge").item(), 1 - d.item(), rel_tol=1e-6
    )
    smooth = dpo_loss(c, r, rc, rr, beta=0.1, label_smoothing=0.1).item()
    assert math.isclose(
        smooth, 0.9 * math.log1p(math.exp(-0.15)) + 0.1 * math.log1p(math.exp(0.15)), rel_tol=1e-6
    )


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"method": "orpo", "ref_adapter": "x"}, "reference-free"),
        ({"method": "kto", "precompute_ref": True}, "KL pairs"),
        ({"method": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}, "--loss-type sigmoid"),
        ({"method": "dpo", "label_smoothing": 0.5}, "label_smoothing"),
        ({"method": "dpo", "pack": True}, "--pack"),
        ({"method": "rlhf"}, "method must be one of"),
    ],
)
def test_settings_that_do_not_go_together_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data="x", **settings).validate()


# whole runs: lorakit train --method dpo ------------------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and a small preference file."""
    import json
    import random

    from fixtures import train_llama

    from lorakit.hf import load_tokenizer

    root = tmp_path_factory.mktemp("pref")
    train_llama(vocab=49152, tie_word_embeddings=True).save_pretrained(root / "model")
    load_tokenizer("smollm2-135m").save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(24):
            words = " ".join(rng.choice(["good", "bad", "dull", "great"]) for _ in range(rng.randint(2, 8)))
            f.write(
                json.dumps(
                    {"prompt": f"Review: {words}. Sentiment:", "chosen": " positive", "rejected": " no"}
                )
                + "\n"
            )
    return root


def _settings(run_folder, out, **kw):
    base = dict(
        model=str(run_folder / "model"),
        data=str(run_folder / "pairs.jsonl"),
        output=str(out),
        method="dpo",
        max_steps=4,
        batch_size=4,
        lr=5e-3,
        warmup_steps=1,
        save_every=2,
        log_every=1,
        threads=1,
    )
    return {**base, **kw}


@pytest.mark.slow
def test_lorakit_train_dpo_logs_rewards_evaluates_and_stores_the_reference(run_folder, tmp_path, one_thread):
    from lorakit.train import resolve_config, run_training
    from lorakit.train.report import read_metrics

    summary = run_training(resolve_config({}, _settings(run_folder, tmp_path / "a", precompute_ref=True)))
    rows = read_metrics(summary.metrics)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in METRICS_LOGGED:
        assert all(key in r for r in train), key
    assert train[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # a fresh adapter is its reference
    base, final = summary.base, summary.final
    assert base["eval_rewards/margins"] == 0 and final["eval_rewards/margins"] > 0
    assert final["eval_loss"] < base["eval_loss"]
    assert (tmp_path / "a" / "reference_logps.safetensors").is_file()
    assert (summary.adapter / "adapter_model.safetensors").is_file()
    # the stored reference is what the model computes with its adapter disabled: same final adapter
    again = run_training(resolve_config({}, _settings(run_folder, tmp_path / "b")))
    for name, value in _adapter_tensors(summary.adapter).items():
        torch.testing.assert_close(_adapter_tensors(again.adapter)[name], value, rtol=1e-4, atol=1e-6)


METRICS_LOGGED = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
)


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_max_minutes_stops_a_dpo_run_and_saves(run_folder, tmp_path, one_thread):
    from lorakit.train import resolve_config, run_training

    summary = run_training(
        resolve_config({}, _settings(run_folder, tmp_path, max_steps=50, max_minutes=1e-4))
    )
    assert summary.last["step"] < 50 and (summary.adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_sigkill_then_resume_is_bitwise_equal(run_folder, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo)}

    def cmd(out, *extra):
        flags = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in _settings(run_folder, out, max_steps=12, save_every=4).items()
        ]
        return [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            *flags,
            "--lora-dropout",
            "0.1",
            "--no-eval-base",
            *extra,
        ]

    subprocess.run(cmd(tmp_path / "a"), cwd=repo, env=env, check=True, capture_output=True)
    b = tmp_path / "b"
    proc = subprocess.Popen(cmd(b), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (b / "checkpoints" / "step-0000004" / "complete.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first checkpoint"
        )
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = subprocess.run(cmd(b, "--resume"), cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    want, got = _adapter_tensors(tmp_path / "a" / "adapter"), _adapter_tensors(b / "adapter")
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_plan_method_dpo_is_lora_with_a_pair_per_row(capsys):
    import json

    from lorakit.cli import main

    def plan(*flags):
        assert main(["plan", "--json", "--batch-size", "2", *flags]) == 0
        return json.loads(capsys.readouterr().out)["plan"]

    assert plan("--method", "dpo", "--seq-len", "64") == plan("--method", "lora", "--seq-len", "128")
