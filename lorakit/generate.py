"""Text generation with LoRA adapters: one code path for `lorakit generate` and the server.

`generate_tokens` runs a batch of prompts step by step with a KV cache. Each row has its own
adapter (a mixed-adapter batch, see `lorakit.mixed`), its own sampling settings and its own stop
(EOS, max tokens, or cancellation); finished rows leave the batch. The CLI runs it with a batch of
one, the server's batcher with many rows, so greedy output is the same token for token (up to
float rounding between batch shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import list_adapters
from .errors import ConfigError
from .mixed import adapter_rows


@dataclass(frozen=True)
class Sampling:
    """How a row picks tokens: greedy when `temperature` is 0, else softmax(logits/T) within top-p."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Row:
    """One prompt of a batch: its token ids, adapter (None: the base model) and sampling."""

    prompt_ids: list[int]
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


def prompt_ids(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of `prompt`: a list of chat messages, or a string (sent as one user message when
    `chat` and the tokenizer has a chat template, else tokenized as is)."""
    if isinstance(prompt, str) and not (chat and getattr(tokenizer, "chat_template", None)):
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template; send a plain prompt instead of messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra} if extra is not None else set()
    return ids


def _choose(logits: torch.Tensor, rows: list[Row], generators: list[torch.Generator]) -> list[int]:
    """Next token per row: argmax for greedy rows, a seeded top-p sample for the others."""
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        s = row.sampling
        if s.temperature == 0:
            continue
        probs = torch.softmax(logits[i].float() / s.temperature, -1)
        if s.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return chosen


def generate_tokens(
    model: nn.Module,
    rows: list[Row],
    eos: set[int],
    pad_id: int = 0,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, int | None, str | None]]:
    """Generate for every row at once; yields `(row, token, None)` per new token and, when a row
    ends, `(row, None, reason)` with reason "stop" (EOS, not yielded as a token), "length" or
    "cancelled" (`cancelled(row)` became true). Runs under `torch.no_grad`.

    Raises `AdapterStateError` for an unknown adapter name (see `lorakit.mixed.adapter_rows`).
    """
    if not rows:
        return
    if any(not r.prompt_ids for r in rows):
        raise ConfigError("a prompt is empty; give at least one token")
    device = next(model.parameters()).device
    longest = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding: every row's next token is at the last position
        ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, longest - len(r.prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(_seed(r.sampling.seed)) for r in rows]
    alive = list(range(len(rows)))  # original row numbers of the batch's current rows
    counts = [0] * len(rows)
    needs_rows = bool(list_adapters(model)) or any(r.adapter is not None for r in rows)
    cache, regroup = None, needs_rows
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad(), contextlib.ExitStack() as stack:
        while alive:
            if regroup:  # (re)assign adapters to the current rows
                stack.close()
                stack.enter_context(adapter_rows(model, [rows[i].adapter for i in alive]))
                regroup = False
            kwargs = {} if cache is None else {cache_kw: cache}
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
            cache = getattr(out, cache_kw)
            chosen = _choose(out.logits[:, -1], [rows[i] for i in alive], [generators[i] for i in alive])
            keep = []
            for j, (i, token) in enumerate(zip(alive, chosen)):
                reason = None
                if cancelled is not None and cancelled(i):
                    reason = "cancelled"
                elif token in eos:
                    reason = "stop"
                else:
                    counts[i] += 1
                    yield i, token, None
                    if counts[i] >= rows[i].sampling.max_tokens:
                        reason = "length"
                if reason:
                    yield i, None, reason
                else:
                    keep.append(j)
            if len(keep) < len(alive):  # drop finished rows from the batch and the cache
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                chosen = [chosen[j] for j in keep]
                alive = [alive[j] for j in keep]
                regroup = needs_rows
            ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
            positions = positions[:, -1:] + 1


def _seed(seed: int | None) -> int:
    return random.randrange(2**63) if seed is None else seed


class TextStream:
    """Turns tokens into text pieces as they come, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        """Add a token; return the new text it completes (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str | list[dict],
    adapter: str | None = None,
    sampling: Sampling | None = None,
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate one reply to `prompt` with `adapter` (None: the base); `on_text` gets each piece."""
    row = Row(prompt_ids(tokenizer, prompt, chat), adapter, sampling or Sampling())
    stream = TextStream(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _, token, _ in generate_tokens(model, [row], eos_ids(model, tokenizer), pad):
        if token is not None and (piece := stream.push(token)) and on_text:
            on_text(piece)
    return stream.text


# command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    parser.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or smollm2-135m")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder (repeatable; several are summed)",
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system message (chat models)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def load_for_inference(model_name: str, adapters: list[str]) -> tuple[nn.Module, object, str | None]:
    """Load the model, its tokenizer and `[NAME=]DIR` adapters; several are combined into one
    adapter equal to their sum. Returns (model, tokenizer, adapter name or None)."""
    from . import hf
    from .io import load_adapter
    from .merge import add_weighted_adapter

    model, tokenizer = hf.load_model(model_name)
    model.eval()
    names = []
    for spec in adapters:
        name, _, folder = spec.rpartition("=")
        name = name or f"adapter{len(names)}"
        load_adapter(model, folder, name)
        names.append(name)
    if len(names) > 1:
        add_weighted_adapter(model, names, [1.0] * len(names), "sum", combination_type="cat")
        return model, tokenizer, "sum"
    return model, tokenizer, names[0] if names else None


def run(args: argparse.Namespace) -> int:
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
    if args.system and not args.raw:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(model, tokenizer, prompt, adapter, sampling, chat=not args.raw, on_text=show)
    sys.stdout.write("\n")
    return 0
