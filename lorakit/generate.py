"""Text generation with LoRA adapters: one code path for `lorakit generate` and the server.

`generate_tokens` runs a batch of prompts step by step with a KV cache. Each row has its own
adapter (a mixed-adapter batch, see `lorakit.mixed`), its own sampling settings and its own stop
(EOS, max tokens, or cancellation); finished rows leave the batch. The CLI runs it with a batch of
one, the server's batcher with many rows, so greedy output is the same token for token (up to
float rounding between batch shapes).
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError
from torch import nn

from ._state import check_name, wrappers
from .adapters import active_adapters, disable_adapters, list_adapters, set_adapter
from .errors import ConfigError
from .mixed import adapter_rows


@dataclass(frozen=True)
class Sampling:
    """How a row picks tokens: greedy when `temperature` is 0, else softmax(logits/T) within top-p."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted from a token's logit once it has appeared
    frequency_penalty: float = 0.0  # ... and this times the number of times it has appeared

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            # torch.Generator.manual_seed takes 64 bits; anything else would fail mid-batch
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ConfigError(f"{key} must be between -2 and 2, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as e:  # e.g. a template that refuses a role
        raise ConfigError(f"the tokenizer's chat template rejects these messages: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_length(model: nn.Module) -> int | None:
    """The most positions `model` takes, prompt and reply together (None: no stated limit)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra} if extra is not None else set()
    return ids


def choose_tokens(
    logits: torch.Tensor,
    samplings: list[Sampling],
    generators: list[torch.Generator],
    history: list[list[int]] | None = None,
) -> list[int]:
    """Next token per row of `logits` [rows, vocab]: argmax for greedy rows, a seeded top-p sample
    for the others, after the presence/frequency penalties over each row's `history` (its tokens
    generated so far). `logits` is changed in place where a penalty applies."""
    penalize_rows(logits, samplings, history)
    chosen = logits.argmax(-1).tolist()
    for i, s in enumerate(samplings):
        if s.temperature == 0:
            continue
        chosen[i] = int(torch.multinomial(sample_probs(logits[i], s), 1, generator=generators[i]))
    return chosen


def sample_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax(`logits` [vocab] / T) within top-p."""
    # in float64 and shifted so the top logit is 0: a tiny temperature then gives -inf (p = 0),
    # never inf - inf or 0 / 0 (a float32 tensor divided by 1e-90 divides by 0)
    shifted = logits.double() - logits.double().max()
    probs = torch.softmax(shifted / s.temperature, -1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return probs


def penalize_rows(logits: torch.Tensor, samplings: list[Sampling], history: list[list[int]] | None) -> None:
    """OpenAI's penalties, in place: logit[t] -= frequency * count(t) + presence * (count(t) > 0)."""
    for i, s in enumerate(samplings):
        if history is None or not history[i] or not (s.presence_penalty or s.frequency_penalty):
            continue
        counts = torch.bincount(torch.tensor(history[i]), minlength=logits.shape[-1])[: logits.shape[-1]]
        counts = counts.to(logits.device, logits.dtype)
        logits[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(logits.dtype)


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
    _check_rows(model, rows)
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
    history: list[list[int]] = [[] for _ in rows]  # each row's tokens so far (the penalties)
    needs_rows = bool(list_adapters(model)) or any(r.adapter is not None for r in rows)
    cache, regroup = None, needs_rows
    cache_kw = cache_argument(model)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        while alive:
            if regroup:  # (re)assign adapters to the current rows
                stack.close()
                stack.enter_context(adapters_for_rows(model, [rows[i].adapter for i in alive]))
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
            chosen = choose_tokens(
                out.logits[:, -1].float(),
                [rows[i].sampling for i in alive],
                [generators[i] for i in alive],
                [history[i] for i in alive],
            )
            keep = []
            for j, (i, token) in enumerate(zip(alive, chosen)):
                reason = None
                if cancelled is not None and cancelled(i):
                    reason = "cancelled"
                elif token in eos:
                    reason = "stop"
                else:
                    history[i].append(token)
                    yield i, token, None
                    if len(history[i]) >= rows[i].sampling.max_tokens:
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


def cache_argument(model: nn.Module) -> str:
    """The name of `model.forward`'s KV-cache argument (and output attribute)."""
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def is_seq2seq(model: nn.Module) -> bool:
    """Whether `model` is an encoder-decoder (T5, BART): its prompt goes to the encoder and the
    reply comes from the decoder, so it is generated by `generate_seq2seq`."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def generate_seq2seq(model: nn.Module, rows: list[Row], eos: set[int], pad_id: int = 0) -> list[list[int]]:
    """The reply token ids (without EOS) of an encoder-decoder model to each row's input ids, with
    each row's adapter: transformers' `generate` (the encoder runs once, the decoder token by token
    with its cache; the model's own generation settings such as BART's forced first token apply).
    Greedy, or sampled with temperature/top-p; rows of one call share the first row's sampling and
    seed, and the seed is applied to a forked RNG, so nothing global changes. Raises what
    `generate_tokens` raises for empty prompts or unknown adapters."""
    if not rows:
        return []
    if any(not r.prompt_ids for r in rows):
        raise ConfigError("a prompt is empty; give at least one token")
    s = rows[0].sampling
    limit = context_length(model)  # learned positions (BART) end there; relative ones (T5) do not
    if limit is not None and (s.max_tokens + 1 > limit or max(len(r.prompt_ids) for r in rows) > limit):
        raise ConfigError(
            f"the prompt or max_tokens {s.max_tokens} is more than the model's {limit} positions; "
            "lower max_tokens or shorten the prompt"
        )
    device = next(model.parameters()).device
    longest = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # the encoder attends both ways: right padding is as good as left
        ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, : len(r.prompt_ids)] = 1
    sampled = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.temperature else {}
    kwargs = {"max_new_tokens": s.max_tokens, "num_beams": 1, "do_sample": False, **sampled}
    with torch.no_grad(), adapters_for_rows(model, [r.adapter for r in rows]):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_seed(s.seed))
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id, **kwargs
            )
    replies = []
    for seq in out[:, 1:].tolist():  # the first token is the decoder's start token
        reply = []
        for token in seq:
            if token in eos:
                break
            reply.append(token)
        replies.append(reply)
    return replies


def _check_rows(model: nn.Module, rows: list[Row]) -> None:
    if any(not r.prompt_ids for r in rows):
        raise ConfigError("a prompt is empty; give at least one token")
    limit = context_length(model)
    for r in rows:  # past it, learned position embeddings (GPT-2) fail mid-batch
        if limit is not None and len(r.prompt_ids) + r.sampling.max_tokens > limit:
            raise ConfigError(
                f"a prompt of {len(r.prompt_ids)} tokens plus max_tokens {r.sampling.max_tokens} is more "
                f"than the model's {limit} positions; lower max_tokens or shorten the prompt"
            )


@contextlib.contextmanager
def adapters_for_rows(model: nn.Module, names: list[str | None], tokens: bool = False) -> Iterator[None]:
    """Inside the block row `i` (with `tokens`: token `i` of one sequence) uses adapter `names[i]`
    (None: the base), through `lorakit.mixed.adapter_rows`; every layer serves rows (or tokens)
    that all use one adapter by its plain path. Rows that all use none disable the adapters. On a
    model with a merged adapter (which routing refuses) rows that all use one adapter make it the
    active one instead, restored afterwards. Raises `AdapterStateError` for an unknown name.

    Routing, not `set_adapter`, because activating an adapter sets the trainable flag of every
    adapter's parameters in every layer: measured 0.2 s per switch on SmolLM2-135M with 8 adapters,
    paid twice per prefill in the server."""
    distinct = set(names)
    if tokens and len(distinct) == 1:  # one adapter for every token: the sequence is one row
        names, tokens = names[:1], False
    if distinct == {None}:
        with disable_adapters(model):
            yield
    elif len(distinct) > 1 or not _has_merged(model):
        with adapter_rows(model, names, tokens):
            yield
    else:
        previous = active_adapters(model)
        set_adapter(model, distinct.pop())
        try:
            yield
        finally:
            set_adapter(model, previous)


def _has_merged(model: nn.Module) -> bool:
    return any(getattr(m, "merged_adapters", None) for m in wrappers(model))


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
    """Generate one reply to `prompt` with `adapter` (None: the base); `on_text` gets each piece.
    An encoder-decoder model (`is_seq2seq`) reads the prompt as plain text (no chat template) and
    its reply comes as one piece."""
    seq2seq = is_seq2seq(model)
    if seq2seq and not isinstance(prompt, str):
        raise ConfigError("an encoder-decoder model takes a plain-text prompt, not chat messages")
    row = Row(prompt_ids(tokenizer, prompt, chat and not seq2seq), adapter, sampling or Sampling())
    stream = TextStream(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if seq2seq:
        reply = generate_seq2seq(model, [row], eos_ids(model, tokenizer), pad)[0]
        text = tokenizer.decode(reply, skip_special_tokens=True)
        if text and on_text:
            on_text(text)
        return text
    for _, token, _ in generate_tokens(model, [row], eos_ids(model, tokenizer), pad):
        if token is not None and (piece := stream.push(token)) and on_text:
            on_text(piece)
    return stream.text


def split_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`"NAME=DIR"` -> (NAME, DIR); `"DIR"` -> (None, DIR). A spec that names an existing folder is
    a folder even if it holds '=' (`runs/lr=1e-4`), and so is one whose NAME part holds a '/'.
    Raises `ConfigError` for an empty folder or a name lorakit cannot use (no '.')."""
    name, sep, folder = spec.partition("=")
    if not sep or "/" in name or Path(spec).is_dir():
        name, folder = "", spec
    if not folder:
        raise ConfigError(f"--adapter {spec!r}: no folder given; expected [NAME=]DIR")
    if sep and name:
        check_name(name)  # the core's rule, checked before the (slow) model load
    return name or None, folder


def load_for_inference(
    model_name: str, adapters: list[str], quantize: str | None = None
) -> tuple[nn.Module, object, str | None]:
    """Load the model, its tokenizer and `[NAME=]DIR` adapters; several are combined into one
    adapter equal to their sum. Returns (model, tokenizer, adapter name or None). `quantize="nf4"`
    loads the base in 4-bit (as QLoRA trained it).

    Raises `ConfigError` for a bad spec or a name given twice, and what `load_adapter` raises."""
    from . import hf
    from .io import load_adapter
    from .merge import add_weighted_adapter

    specs = [split_adapter_spec(s) for s in adapters]  # all checked before the (slow) model load
    given = [name for name, _ in specs if name]
    if len(set(given)) < len(given):
        raise ConfigError(f"--adapter: a name is given twice in {given}")
    model, tokenizer = hf.load_model(model_name, quantize=quantize, task=inference_task(model_name))
    model.eval()
    names: list[str] = []
    for name, folder in specs:
        name = name or _fresh(f"adapter{len(names)}", given)
        tokenizer = _tokens_of(model, tokenizer, folder)
        load_adapter(model, folder, name)
        names.append(name)
    if len(names) > 1:
        total = _fresh("sum", names)
        add_weighted_adapter(model, names, [1.0] * len(names), total, combination_type="cat")
        return model, tokenizer, total
    return model, tokenizer, names[0] if names else None


def _tokens_of(model: nn.Module, tokenizer, folder: str):
    """The tokenizer saved with an adapter trained with added tokens (`--add-tokens`), the model's
    embeddings grown to it; otherwise `tokenizer` unchanged."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return tokenizer
    import transformers

    saved = transformers.AutoTokenizer.from_pretrained(folder)
    if saved.pad_token is None:
        saved.pad_token = saved.eos_token
    if len(saved) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(saved))
    return saved


def inference_task(model_name: str) -> str:
    """The task to load `model_name` with for generation: seq2seq for an encoder-decoder model
    (its config.json says `is_encoder_decoder`), causal-lm otherwise."""
    import json

    from . import hf
    from .tasks import CAUSAL_LM, SEQ2SEQ

    try:
        config = json.loads((hf.resolve(model_name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return CAUSAL_LM  # the model load that follows names the problem
    return SEQ2SEQ if isinstance(config, dict) and config.get("is_encoder_decoder") else CAUSAL_LM


def _fresh(name: str, taken: list[str]) -> str:
    while name in taken:
        name += "_"
    return name
