"""The training loop: AdamW, warmup + cosine/linear schedule, gradient accumulation, clipping,
bf16 autocast, data parallelism, checkpoints and exact resume. Model-agnostic: any `nn.Module`
called as `model(**batch)` that returns `.logits` (or at least `.loss`).

The loss of an optimizer step is the sum of per-token (per-example for classification) losses
divided by the step's token count over all micro-batches and processes. So accumulation and data
parallelism give the same update as one big batch, whatever the padding, which is what lets a
2-process run match a 1-process one.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._heap import HeapTrimmer, heap_trimming
from ..errors import ConfigError, DataError, TrainingError
from ..modeling import decoder_layers
from ..tasks import CAUSAL_LM, IGNORE_INDEX, SEQ2SEQ, TOKEN_CLASSIFICATION, model_task
from . import distributed as dist
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .head_loss import head_loss_sum, plain_lm_head
from .lora_plus import group_lr, head_groups, lora_plus_groups
from .preference import MetricSums, preference_loss_sum
from .report import MetricsLog
from .sharding import is_sharded

log = logging.getLogger(__name__)


def batch_plan(
    lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 16
) -> list[list[int]]:
    """The global batches (lists of example indices) of `epoch`, a pure function of its arguments.

    A seeded shuffle, then, within windows of `window` batches, examples sorted by length so a batch
    holds similar lengths (little padding); batch order is shuffled again. An incomplete last batch
    is dropped. Raises `DataError` when there are fewer examples than one batch.
    """
    n = len(lengths)
    if n < batch_size:
        raise DataError(
            f"only {n} training examples for a batch of {batch_size}; lower --batch-size or add data"
        )
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    order = order[: n - n % batch_size]
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup, then cosine/linear decay to 0 or flat."""
    warm = min(cfg.warmup_steps, total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return max(0.0, 1 - frac) if cfg.schedule == "linear" else 1.0

    return f


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> None:
    """After a resume: give the restored optimizer and scheduler `cfg`'s peak lr and weight decay
    (the checkpoint holds the old ones), so the next steps use exactly what a run started with these
    settings would at this step. Untouched when they are unchanged (a resume stays bitwise exact)."""
    peaks = [group_lr(g, cfg.lr) for g in optimizer.param_groups]  # LoRA+ groups keep their ratios
    decays = [cfg.weight_decay if g.get("decay", True) else 0.0 for g in optimizer.param_groups]
    if scheduler.base_lrs == peaks and [g["weight_decay"] for g in optimizer.param_groups] == decays:
        return
    scheduler.base_lrs = peaks
    for group, factor, peak, decay in zip(optimizer.param_groups, scheduler.lr_lambdas, peaks, decays):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)
        group["weight_decay"] = decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr reports


def count_targets(example: dict[str, Any]) -> int:
    """How many loss terms `example` adds: its predicted label tokens, or 1 for a class label, a
    preference pair or a KTO example (every target token of a seq2seq example, every tagged token of
    a token-classification one)."""
    if "label" in example or "prompt_len" in example:
        return 1
    if "labels" not in example:
        return sum(1 for t in example.get("target_ids", example.get("token_labels", ())) if t != IGNORE_INDEX)
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def no_cache(inputs: dict, model: nn.Module) -> dict:
    """`inputs` plus `use_cache=False` for a transformers model that would otherwise build a KV
    cache in a training forward (Llama and most causal LMs do by default): the cache keeps every
    layer's keys and values alive beside what autograd saves, and its per-layer state makes
    `torch.compile` recompile each decoder layer."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        return {**inputs, "use_cache": False}
    return inputs


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of a micro-batch (causal LM: next-token cross-entropy over labelled positions;
    classification: cross-entropy of the class logits; seq2seq: cross-entropy of the decoder's
    logits against the targets; token classification: of each tagged token's logits). Only the
    positions from the first labelled one on reach the output head when the model takes
    `logits_to_keep` (transformers' causal LMs do), which skips most of the vocabulary projection
    when the loss is on short answers. A causal LM with a plain head (`head_loss.plain_lm_head`)
    never builds the full logits: the loss and its gradient are computed chunk by chunk from the
    last hidden states (`head_loss.head_loss_sum`)."""
    labels = batch["labels"]
    head = plain_lm_head(model) if labels.dim() == 2 else None
    if head is None or model_task(model) != CAUSAL_LM:
        return forward_loss(model, batch)[0]
    first = first_labelled(labels)
    if first is None:
        return torch.zeros((), device=labels.device, requires_grad=True)
    inputs = no_cache({k: v for k, v in batch.items() if k != "labels"}, model)
    hidden = model.base_model(**inputs)[0]
    target = F.pad(labels[:, first:], (0, 1), value=IGNORE_INDEX)
    return head_loss_sum(hidden[:, first - 1 :], head.weight, target)


def forward_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(summed loss, logits, first) of a micro-batch, for the loss and the evaluation. The logits
    are the class logits [B, C], the decoder's or the tagger's [B, T, V] (first 0), or a causal
    LM's `answer_logits` from position `first - 1` on; None (loss 0) when nothing is labelled."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if labels.dim() == 1:
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float(), labels, reduction="sum"), logits, 0
    task = model_task(model)
    if task in (SEQ2SEQ, TOKEN_CLASSIFICATION):
        if task == SEQ2SEQ:
            inputs["decoder_input_ids"] = decoder_inputs(model, labels)
        logits = model(**inputs).logits
        return aligned_loss_sum(logits, labels), logits, 0
    logits, first = answer_logits(model, no_cache(inputs, model), labels)
    if logits is None:
        return torch.zeros((), device=labels.device, requires_grad=True), None, 0
    return lm_loss_sum(logits, labels, first), logits, first


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's input ids for seq2seq `labels`: shifted right behind the decoder start token,
    -100 read as padding (the model's own `prepare_decoder_input_ids_from_labels`, which T5, BART
    and the others implement; built from the config's ids otherwise)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return prepare(labels=labels)
    config = model.config
    start = config.decoder_start_token_id
    if start is None or config.pad_token_id is None:
        raise ConfigError(
            f"{type(model).__name__}: config.decoder_start_token_id and pad_token_id must be set to train seq2seq"
        )
    shifted = F.pad(labels[:, :-1], (1, 0), value=start)
    return shifted.masked_fill(shifted == IGNORE_INDEX, config.pad_token_id)


def answer_logits(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """(logits of positions `first - 1` on, `first`): `first` is the batch's first labelled position,
    so `logits[:, j]` predicts the token at `first + j`. (None, 0) when nothing is labelled."""
    first = first_labelled(labels)
    if first is None:
        return None, 0
    keep = labels.shape[1] - first + 1
    if _accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits, first
    return model(**inputs).logits[:, first - 1 :], first


def first_labelled(labels: torch.Tensor) -> int | None:
    """The batch's first labelled position (>= 1; the logits before it predict it), None if none."""
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return None if len(labelled) == 0 else int(labelled[0]) + 1


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, first: int) -> torch.Tensor:
    """Summed next-token loss of `answer_logits`' output against `labels`."""
    # the targets are shifted, not the logits (the last position predicts nothing): slicing the
    # logits would copy the [tokens, vocab] tensor in the forward and again in the backward
    return aligned_loss_sum(logits, F.pad(labels[:, first:], (0, 1), value=IGNORE_INDEX))


def aligned_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits[b, t]` against `target[b, t]`, skipping -100."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class Progress:
    """Where training is: the step done, the epoch, the next batch of that epoch, tokens seen."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    tokens: int = 0


def train(
    model: nn.Module,
    examples: list[dict[str, Any]],
    cfg: TrainConfig,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Train the trainable parameters of `model` on `examples`; return the metrics rows.

    Writes (rank 0 only) `metrics.jsonl` and checkpoints under `cfg.output`; with `cfg.resume` it
    continues from the newest complete checkpoint there. `evaluate(model, step)` runs before
    training (step 0, when `cfg.eval_base`), every `cfg.eval_every` steps, and at the end. Raises `TrainingError` on a non-finite loss (the newest
    checkpoint stays the last good one), `ConfigError` for nothing to train or a batch that does
    not split over processes and accumulation steps.
    """
    entered = time.perf_counter()  # the time budget covers the base evaluation too
    device = device or torch.device("cpu")
    world = torch.distributed.get_world_size() if dist.active() else 1
    rank = torch.distributed.get_rank() if dist.active() else 0
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; inject an adapter first")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must split evenly over {world} process(es) x grad_accum {cfg.grad_accum}"
        )
    out = Path(cfg.output)
    lengths = [len(e["input_ids"]) for e in examples]
    per_epoch = len(batch_plan(lengths, cfg.batch_size, cfg.seed, 0))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer, scheduler, prog = _start(model, params, cfg, total)
    metrics = MetricsLog(out, enabled=dist.is_main())
    metrics.start(prog.step)
    autocast = _autocast(cfg, device)
    bar = _progress_bar(total, prog.step, dist.is_main())
    rows: list[dict[str, Any]] = []
    if evaluate is not None and cfg.eval_base and prog.step == 0:
        rows.append(metrics.write({"step": 0, **_evaluate(model, evaluate, 0)}))
    started, busy, tokens_at_start = time.perf_counter(), 0.0, prog.tokens
    model.train()
    trim_heap = HeapTrimmer(enabled=cfg.trim_heap and device.type == "cpu")
    while prog.step < total:
        plan = batch_plan(lengths, cfg.batch_size, cfg.seed, prog.epoch)
        while prog.position < len(plan) and prog.step < total:
            batch_idx = plan[prog.position]
            share = len(batch_idx) // world
            mine = [examples[i] for i in batch_idx[rank * share : (rank + 1) * share]]
            t0 = time.perf_counter()
            loss, tokens, extra = _step(model, mine, cfg, collate, device, autocast, trim_heap)
            grad_norm = _update(params, optimizer, scheduler, cfg)
            trim_heap()
            busy += time.perf_counter() - t0  # tokens/s counts training only, not evals or saves
            _check_finite(loss, grad_norm, prog.step + 1, out)
            prog.step += 1
            prog.position += 1
            prog.tokens += tokens
            elapsed = time.perf_counter() - started
            speed = (prog.tokens - tokens_at_start) / max(busy, 1e-9)
            row = {
                "step": prog.step,
                "epoch": round(prog.epoch + prog.position / len(plan), 4),
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": round(speed, 1),
                "time_s": round(elapsed, 1),
                "train_s": round(busy, 3),
                **extra,
            }
            total = _budget(cfg, prog.step, total, entered)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}", **_bar_extra(extra))
            if prog.step % cfg.log_every == 0 or prog.step == total:
                rows.append(metrics.write(row))
            last = prog.step == total
            if last or (cfg.save_every and prog.step % cfg.save_every == 0):
                _save(out, prog, model, optimizer, scheduler, cfg)
            if evaluate is not None and (last or (cfg.eval_every and prog.step % cfg.eval_every == 0)):
                rows.append(metrics.write({"step": prog.step, **_evaluate(model, evaluate, prog.step)}))
        if prog.position >= len(plan):
            prog.epoch, prog.position = prog.epoch + 1, 0
    if bar is not None:
        bar.close()
    metrics.close()
    return rows


def _start(model: nn.Module, params: list, cfg: TrainConfig, total: int) -> tuple[Any, Any, Progress]:
    """The optimizer, the schedule and the progress: fresh (every process starting from rank 0's
    values), or restored from the newest complete checkpoint with `cfg.resume`."""
    if cfg.lora_plus_ratio:
        groups = lora_plus_groups(model, cfg.lr, cfg.lora_plus_ratio, cfg.weight_decay)
    elif cfg.head_lr:
        groups = head_groups(model, cfg.lr, cfg.head_lr)
    else:
        groups = params
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    folder = Path(cfg.output) / "checkpoints"
    ckpt = latest_checkpoint(folder) if cfg.resume else None
    if ckpt is not None:
        prog = Progress(**load_checkpoint(ckpt, model, optimizer, scheduler))
        apply_settings(optimizer, scheduler, cfg)
        log.info("resuming from %s (step %d)", ckpt, prog.step)
        return optimizer, scheduler, prog
    if cfg.resume:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", folder)
    else:
        dist.broadcast_params(params)
    return optimizer, scheduler, Progress()


def _check_finite(loss: float, grad_norm: float, step: int, out: Path) -> None:
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingError(
            f"non-finite loss or gradient at step {step} (loss={loss}, grad norm={grad_norm}); "
            f"the last good checkpoint is kept in {out / 'checkpoints'}. Lower --lr, or use --precision fp32"
        )


def _budget(cfg: TrainConfig, step: int, total: int, entered: float) -> int:
    """The step to finish at: `total`, or this step once any process is past `cfg.max_minutes`."""
    if cfg.max_minutes and step < total and _out_of_time(time.perf_counter() - entered, cfg.max_minutes):
        log.warning(
            "time budget of %s min reached at step %d of %d; finishing now", cfg.max_minutes, step, total
        )
        return step
    return total


def _save(out: Path, prog: Progress, model, optimizer, scheduler, cfg: TrainConfig) -> None:
    """Every process joins (a sharded model is gathered first); rank 0 writes the checkpoint."""
    save_checkpoint(
        out / "checkpoints", prog.step, model, optimizer, scheduler, vars(prog), cfg.keep_checkpoints
    )
    dist.barrier()


def _step(model, mine, cfg, collate, device, autocast, trim_heap) -> tuple[float, int, dict]:
    """Forward and backward over this process's share of one global batch (in `grad_accum` pieces).
    Returns the step's global mean loss, its global input-token count and the objective's metrics
    (preference methods: rewards, accuracies, margins, log-probs; none for SFT)."""
    sums = MetricSums(cfg.method)
    counts = torch.tensor(
        [float(sum(count_targets(e) for e in mine)), float(sum(len(e["input_ids"]) for e in mine))]
    )
    dist.all_reduce_sum(counts)
    denom = max(counts[0].item(), 1.0)
    size = len(mine) // cfg.grad_accum
    total = torch.zeros(())
    for k in range(cfg.grad_accum):
        piece = mine[k * size : (k + 1) * size]
        if not piece:
            continue
        batch = {key: v.to(device) for key, v in collate(piece).items()}
        with heap_trimming(decoder_layers(model), trim_heap):  # hooks only when --trim-heap on a CPU
            with autocast:
                if cfg.method == "sft":
                    loss = loss_sum(model, batch)
                else:
                    loss = preference_loss_sum(model, batch, cfg, sums)
            (loss / denom).backward()
        total += loss.detach().float().cpu()
    dist.all_reduce_sum(total)
    extra = sums.means() if cfg.method != "sft" else {}
    return total.item() / denom, int(counts[1].item()), extra


def _out_of_time(elapsed: float, minutes: float) -> bool:
    """Whether any process is past the budget (all of them must stop at the same step)."""
    late = torch.tensor([float(elapsed > 60 * minutes)])
    return dist.all_reduce_sum(late).item() > 0


def _update(params, optimizer, scheduler, cfg) -> float:
    dist.all_reduce_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(
        params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    )
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _evaluate(
    model: nn.Module, evaluate: Callable[[nn.Module, int], dict[str, float]], step: int
) -> dict[str, float]:
    """Evaluate on rank 0 while the others wait (a sharded model: on every process in step, each
    forward being a collective; rank 0's result is kept); back to train mode after."""
    result: dict[str, float] = {}
    if dist.is_main() or is_sharded(model):
        model.eval()
        with torch.no_grad():
            result = evaluate(model, step)
        model.train()
    dist.barrier()
    return result if dist.is_main() else {}


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when `uses_bf16`; otherwise a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training computes in bf16: when asked, or by default on a GPU that supports it."""
    return cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )


def _bar_extra(extra: dict[str, float]) -> dict[str, str]:
    return {"acc": f"{extra['rewards/accuracies']:.2f}"} if "rewards/accuracies" in extra else {}


def _progress_bar(total: int, initial: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
