"""Preference objectives on adapters: DPO (sigmoid / IPO / hinge, label smoothing), ORPO, SimPO, KTO.

The reference policy is the model itself with its adapters switched off (`lorakit.disable_adapters`),
or with a frozen copy of the starting adapter (`--ref-adapter`, loaded as adapter "ref"): no second
model is loaded. One forward scores chosen and rejected together with the prompt encoded once (see
`lorakit.data.preference.collate_pairs`), and the log-probabilities come from the hidden states in
chunks, each chunk's logits recomputed in the backward, so the [tokens, vocab] logits never exist whole.

The losses are pure functions of summed log-probabilities (tensors in, tensors out), checked against
TRL 1.16 (tests/test_train_preference.py). Where TRL and the papers differ (docs/preference.md):
- DPO label smoothing: lorakit's is conservative DPO (cDPO, Mitchell 2023:
  -(1-e) logsig(b d) - e logsig(-b d)); TRL 1.16 dropped it from "sigmoid" (its `label_smoothing` is
  robust DPO's / EXO's). The test builds cDPO from TRL's "sigmoid" and "robust" terms.
- IPO: TRL divides each completion's log-ratio by its length (it says the IPO authors confirmed it);
  lorakit follows TRL.
- ORPO: TRL's NLL term covers the prompt and the response, averaged over the batch's tokens; the paper's
  L_SFT is on the chosen response, which lorakit uses (the mean log-prob per chosen token, per pair).
- KTO: the KL reference point z0 is TRL's estimate: the mean over the micro-batch of
  log pi(y'|x) - log ref(y'|x) on mismatched pairs (x_i, y_{i-1}), detached and clamped at 0. TRL rotates
  completions in dataset order and so must read the data in order (it refuses a shuffling sampler);
  lorakit rotates within each micro-batch of its shuffled batches, so the mismatched completions are
  still the batch's own. Losses are TRL's 1 - sigmoid form (the paper's lambda - v up to a constant).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import _state
from ..adapters import disable_adapters
from ..errors import ConfigError, DataError
from . import distributed as dist

METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCE_METHODS = ("dpo", "kto")  # ORPO and SimPO are reference-free
REF_ADAPTER = "ref"
CHUNK_TOKENS = 1024  # tokens per chunk of the output head (a chunk's logits: CHUNK_TOKENS x vocab floats)
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


# losses: pure functions of per-example log-probabilities -------------------------------------


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO loss from summed completion log-probs (policy and reference); IPO needs the
    completion lengths (each log-ratio is divided by its length, as TRL does)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    delta = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "hinge":
        return torch.relu(1 - delta)
    return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)


def simpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, beta: float, gamma: float
) -> torch.Tensor:
    """Per-pair SimPO loss from mean log-prob per completion token: -logsig(b (c - r) - gamma)."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(avg_logp), stable near p = 1 (log(1 - p) via expm1 there)."""
    t = -math.log(2)
    log1m = torch.where(avg_logp < t, torch.log1p(-torch.exp(avg_logp)), torch.log(-torch.expm1(avg_logp)))
    return avg_logp - log1m


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, lam: float) -> torch.Tensor:
    """Per-pair ORPO loss: the chosen response's NLL (mean per token) + lam * -logsig(log odds ratio)."""
    ratio = log_odds(chosen_avg) - log_odds(rejected_avg)
    return -chosen_avg - lam * F.logsigmoid(ratio)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO loss: w_d (1 - sig(b (r - z0))) for desirable, w_u (1 - sig(b (z0 - r))) for
    undesirable examples, r the log-ratio to the reference and z0 = `kl` (no gradient)."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad)


# log-probabilities of both completions from one forward ----------------------------------------


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Summed log-probs and token counts of each row's two completions (`collate_pairs`' layout):
    {"first", "second", "first_len", "second_len"}, each [B]."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    srcs = torch.cat([batch["first_src"], batch["second_src"]], 1)
    tgts = torch.cat([batch["first_tgt"], batch["second_tgt"]], 1)
    valid = tgts >= 0
    per_token = _token_logps(model, inputs, srcs.clamp(min=0), tgts.clamp(min=0)) * valid
    n = batch["first_src"].shape[1]
    return {
        "first": per_token[:, :n].sum(1),
        "second": per_token[:, n:].sum(1),
        "first_len": valid[:, :n].sum(1),
        "second_len": valid[:, n:].sum(1),
    }


def _token_logps(model: nn.Module, inputs: dict, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """log p(tgt[b, j] | position src[b, j]) in fp32, [B, N]."""
    head, backbone = _split(model)
    if head is None:  # a model we cannot split: its own logits, from the first needed position on
        keep = inputs["input_ids"].shape[1] - int(src.min())
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
        lse = torch.logsumexp(logits, -1).gather(1, src - int(src.min()))
        flat = logits.reshape(logits.shape[0], -1)
        return flat.gather(1, (src - int(src.min())) * logits.shape[-1] + tgt) - lse
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    rows = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1])).reshape(-1, hidden.shape[-1])
    flat_tgt = tgt.reshape(-1)
    pieces = []
    for start in range(0, rows.shape[0], CHUNK_TOKENS):
        h, t = rows[start : start + CHUNK_TOKENS], flat_tgt[start : start + CHUNK_TOKENS]
        if torch.is_grad_enabled():  # keep only the chunk's inputs; its logits are recomputed in the backward
            pieces.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t))
    return torch.cat(pieces).reshape(tgt.shape)


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), tgt, reduction="none")


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _split(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(output head, backbone) of a transformers causal LM whose logits are `head(hidden)`; (None,
    None) for anything else (models that scale or cap their logits keep their own forward)."""
    get_head = getattr(model, "get_output_embeddings", None)
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if get_head is None or backbone is None or backbone is model or config is None:
        return None, None
    if any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS):
        return None, None
    return get_head(), backbone


# the step ----------------------------------------------------------------------------------


@contextmanager
def reference(model: nn.Module):
    """The reference policy inside the block: the frozen "ref" adapter when the model carries one,
    else the model with its adapters disabled."""
    if REF_ADAPTER not in _state.names(model):
        with disable_adapters(model):
            yield
        return
    active = _state.active(model)
    _state.set_active(model, [REF_ADAPTER])
    try:
        yield
    finally:
        _state.set_active(model, active)


class MetricSums:
    """Sums and counts of per-example metric values over a step's micro-batches (and processes)."""

    def __init__(self, method: str) -> None:
        self.keys = KTO_METRICS if method == "kto" else METRICS
        self.sums = torch.zeros(2, len(self.keys), dtype=torch.float64)

    def add(self, key: str, values: torch.Tensor) -> None:
        """Add the per-example `values` of metric `key`."""
        i = self.keys.index(key)
        self.sums[0, i] += values.detach().double().sum().cpu()
        self.sums[1, i] += values.numel()

    def means(self, prefix: str = "", reduce: bool = True) -> dict[str, float]:
        """The mean of each metric over everything added (over all processes when `reduce`)."""
        if reduce:
            dist.all_reduce_sum(self.sums)
        return {prefix + k: s / n for k, s, n in zip(self.keys, *self.sums.tolist()) if n}


def preference_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any, sums: MetricSums
) -> torch.Tensor:
    """Summed per-example loss of `cfg.method` over a collated batch (`collate_pairs`), adding its
    metrics to `sums`; the reference comes from `batch["ref_*"]` (precomputed) or a no-grad forward."""
    ref = None
    if cfg.method in REFERENCE_METHODS:
        if "ref_first" in batch:
            ref = {k: batch[f"ref_{k}"].float() for k in ("first", "second")}
        else:  # first: its activations are freed before the policy's graph is built
            with torch.no_grad(), reference(model):
                ref = completion_logps(model, batch)
    policy = completion_logps(model, batch)
    if ref is not None:
        ref = {k: v.to(policy["first"]) for k, v in ref.items()}
    if cfg.method == "kto":
        return _kto(policy, ref, batch["desirable"], cfg, sums)
    chosen, rejected = policy["first"], policy["second"]
    chosen_avg, rejected_avg = (
        chosen / policy["first_len"].clamp(min=1),
        rejected / policy["second_len"].clamp(min=1),
    )
    if cfg.method == "dpo":
        losses = dpo_loss(
            chosen, rejected, ref["first"], ref["second"], beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing, chosen_len=policy["first_len"], rejected_len=policy["second_len"],
        )  # fmt: skip
        rewards = (cfg.beta * (chosen - ref["first"]), cfg.beta * (rejected - ref["second"]))
    elif cfg.method == "simpo":
        losses = simpo_loss(chosen_avg, rejected_avg, beta=cfg.beta, gamma=cfg.simpo_gamma)
        rewards = (cfg.beta * chosen_avg, cfg.beta * rejected_avg)
    else:
        losses = orpo_loss(chosen_avg, rejected_avg, lam=cfg.orpo_lambda)
        rewards = (cfg.orpo_lambda * chosen_avg, cfg.orpo_lambda * rejected_avg)
    logps = (chosen, rejected) if cfg.method == "dpo" else (chosen_avg, rejected_avg)  # what each rewards
    for key, value in zip(
        METRICS, (*rewards, (rewards[0] > rewards[1]).float(), rewards[0] - rewards[1], *logps)
    ):
        sums.add(key, value)
    return losses.sum()


def _kto(policy: dict, ref: dict, desirable: torch.Tensor, cfg: Any, sums: MetricSums) -> torch.Tensor:
    kl = (policy["second"] - ref["second"]).mean().detach().clamp(min=0)
    losses = kto_loss(
        policy["first"], ref["first"], desirable, kl, beta=cfg.beta,
        desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight,
    )  # fmt: skip
    rewards = cfg.beta * (policy["first"] - ref["first"])
    for key, mask in (("chosen", desirable), ("rejected", ~desirable)):
        sums.add(f"rewards/{key}", rewards[mask])
        sums.add(f"logps/{key}", policy["first"][mask])
    sums.add("kl", kl.reshape(1))
    return losses.sum()


def check_method(cfg: Any) -> None:
    """Refuse settings that do not go with `cfg.method` (`ConfigError` naming the flags)."""
    if cfg.method == "sft":
        return
    if cfg.task != "causal-lm":
        raise ConfigError(f"--method {cfg.method} trains a causal LM; drop --task {cfg.task}")
    if cfg.pack:
        raise ConfigError(f"--pack joins SFT examples; --method {cfg.method} lays out its own pairs")
    if cfg.method not in REFERENCE_METHODS and (cfg.ref_adapter or cfg.precompute_ref):
        raise ConfigError(f"--method {cfg.method} is reference-free; drop --ref-adapter / --precompute-ref")
    if cfg.method == "kto" and cfg.precompute_ref:
        raise ConfigError("--precompute-ref is for dpo: KTO's KL pairs change with every batch")
    if cfg.method == "dpo" and cfg.loss_type != "sigmoid" and cfg.label_smoothing:
        raise ConfigError(f"--label-smoothing goes with --loss-type sigmoid, not {cfg.loss_type}")


# the run: data, collate, evaluation, reference adapter, precomputed reference --------------------

REFERENCE_FILE = "reference_logps.safetensors"


def preference_data(cfg: Any, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples of `cfg.data` (and `cfg.eval_data`, else a held-out fraction) for
    `cfg.method`. Raises `DataError` when the data is not the method's format (naming the columns)."""
    from ..data import builtin, preference
    from ..data.collate import split

    fmt = preference.UNPAIRED if cfg.method == "kto" else preference.PAIRS

    def encode(ref: str) -> list[dict]:
        records = builtin.read_dataset(ref, seed=cfg.seed).records
        if records and preference.preference_format(records) != fmt:
            raise DataError(
                f"{ref}: --method {cfg.method} needs records with {', '.join(preference._COLUMNS[fmt])}; "
                f"the first record has {sorted(records[0]) if isinstance(records[0], dict) else records[0]!r}"
            )
        return preference.encode_preference(records, tokenizer, fmt, max_length=cfg.max_length).examples

    train_ex = encode(cfg.data)
    if cfg.eval_data:
        eval_ex = encode(cfg.eval_data)
    elif cfg.eval_fraction > 0:
        train_ex, eval_ex = split(train_ex, cfg.eval_fraction, seed=cfg.seed)
    else:
        eval_ex = []
    return train_ex, eval_ex[: cfg.max_eval] if cfg.max_eval is not None else eval_ex


def preference_collate(cfg: Any, pad_token_id: int):
    """The collate function of `cfg.method`: `collate_pairs`, after KTO's KL completions."""
    from ..data.preference import collate_pairs, with_kl_completions

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        examples = with_kl_completions(examples) if cfg.method == "kto" else examples
        return collate_pairs(examples, pad_token_id)

    return collate


def preference_evaluator(examples: list[dict], collate, cfg: Any, *, batch_size: int, device=None):
    """`evaluate(model, step)`: the objective's mean loss and metrics on `examples` (eval_ prefix).
    The model is scored as it is: at step 0 a fresh adapter is the base model (B = 0), and a run from
    --ref-adapter starts as its reference."""

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        sums, total = MetricSums(cfg.method), 0.0
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        for start in range(0, len(order), batch_size):
            piece = [examples[i] for i in order[start : start + batch_size]]
            batch = {k: v.to(device) if device else v for k, v in collate(piece).items()}
            total += preference_loss_sum(model, batch, cfg, sums).item()
        return {"eval_loss": total / max(len(examples), 1), **sums.means("eval_", reduce=False)}

    return evaluate


def add_ref_adapter(model: nn.Module, path: str) -> None:
    """Start from the adapter in `path` (trainable, "default") with a frozen copy as the reference."""
    from ..io import load_adapter

    load_adapter(model, path)
    load_adapter(model, path, adapter=REF_ADAPTER, activate=False)
    _state.set_active(model, ["default"])


def precompute_reference(
    model: nn.Module, examples: list[dict], collate, folder, *, batch_size: int, device=None
) -> None:
    """Give every example its reference log-probs (`ref_first`, `ref_second`), read from
    `folder/reference_logps.safetensors` when it holds them (a resumed run), else computed once (no
    grad, the reference policy) and written there atomically."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from .._atomic import atomic_write

    path = Path(folder) / REFERENCE_FILE
    saved = load_file(str(path)) if path.is_file() else {}
    if saved.get("first") is None or len(saved["first"]) != len(examples):
        first, second = [], []
        with torch.no_grad(), reference(model):
            for start in range(0, len(examples), batch_size):
                batch = {
                    k: v.to(device) if device else v
                    for k, v in collate(examples[start : start + batch_size]).items()
                }
                out = completion_logps(model, batch)
                first.append(out["first"].cpu())
                second.append(out["second"].cpu())
        saved = {"first": torch.cat(first), "second": torch.cat(second)}
        if dist.is_main():
            atomic_write(path, lambda tmp: save_file(saved, str(tmp)))
    for ex, a, b in zip(examples, saved["first"].tolist(), saved["second"].tolist()):
        ex["ref_first"], ex["ref_second"] = a, b
