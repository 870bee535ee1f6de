"""lorakit.serve.scheduler (continuous batching): requests joining and leaving a running batch at
every step, with different adapters, prompt lengths (chunked prefill), output lengths, sampling
settings and penalties, each give what `lorakit.generate` gives for that request alone; the caps
on rows and tokens hold; loads and unloads happen while other adapters' rows run.
"""

import asyncio
import random

import pytest
import torch
from fixtures import make_adapter, make_embedding_adapter, tiny_chat_model

import lorakit
import lorakit.hf
from lorakit.generate import Row, Sampling, TextStream, eos_ids, generate_tokens, prompt_ids
from lorakit.serve import AdapterCache, Engine
from lorakit.serve.engine import Done, Failed, Text
from lorakit.serve.engine import Request as Job

PROMPTS = [
    "Hello there",
    "A much longer prompt that has many more tokens than the others, so it is prefilled in chunks",
    "x",
    "Count: one two three four",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    folder = tiny_chat_model(d / "model")
    paths = {f"a{i}": make_adapter(folder, d / f"a{i}", i, r=4 + i) for i in range(1, 4)}
    ref, tok = lorakit.hf.load_model(folder)
    for name, path in paths.items():
        lorakit.load_adapter(ref, path, name)
    return {"folder": folder, "paths": paths, "ref": ref, "tok": tok, "dir": d}


def alone(setup, row: Row) -> list[int]:
    """The tokens `lorakit.generate` gives `row` served alone."""
    ref, tok = setup["ref"], setup["tok"]
    return [t for _, t, _ in generate_tokens(ref, [row], eos_ids(ref, tok), 0) if t is not None]


def alone_text(setup, row: Row) -> str:
    """The text the server streams for those tokens (an unfinished UTF-8 character held back)."""
    stream = TextStream(setup["tok"])
    for token in alone(setup, row):
        stream.push(token)
    return stream.text


def serve(engine: Engine, rows: list[Row], gap_s: float = 0.01, logprobs=None) -> list[list]:
    """Submit `rows` one by one, `gap_s` apart (so they join a running batch), return their events."""

    async def main():
        loop = asyncio.get_running_loop()
        engine.start()
        jobs = []
        try:
            for row in rows:
                jobs.append(Job(row, loop, logprobs=logprobs))
                engine.submit(jobs[-1])
                await asyncio.sleep(gap_s)
            out = []
            for job in jobs:
                events = [await asyncio.wait_for(job.events.get(), 60)]
                while isinstance(events[-1], Text):
                    events.append(await asyncio.wait_for(job.events.get(), 60))
                out.append(events)
            return out
        finally:
            engine.stop()

    return asyncio.run(main())


def engine_for(setup, **kw) -> Engine:
    model, tok = lorakit.hf.load_model(setup["folder"])
    return Engine(model, tok, AdapterCache(model, setup["paths"]), **kw)


def test_joining_rows_give_what_each_gets_alone(setup, one_thread):
    tok = setup["tok"]
    engine = engine_for(setup, max_batch=4, max_batch_tokens=400, prefill_chunk=16)
    names = [None, "a1", "a2", "a3"]
    rows = [
        Row(prompt_ids(tok, PROMPTS[i % 4], chat=False), names[(i // 2) % 4], Sampling(4 + 3 * (i % 5)))
        for i in range(14)
    ]
    events = serve(engine, rows)
    for row, ev in zip(rows, events):
        assert isinstance(ev[-1], Done), ev[-1]
        assert "".join(e.piece for e in ev[:-1]) == alone_text(setup, row)
        assert ev[-1].completion_tokens == len(alone(setup, row))
    assert engine.max_rows_seen == 4  # the row cap held, and rows shared forwards
    assert engine.batches >= 8  # prefill groups joined a running batch, not one batch for all


def test_sampling_seeds_penalties_and_logprobs_as_alone(setup, one_thread):
    tok = setup["tok"]
    engine = engine_for(setup, max_batch=3)
    ids = prompt_ids(tok, "Dice and more dice", chat=False)
    rows = [
        Row(ids, "a1", Sampling(8, 0.9, 0.95, 11)),
        Row(ids, "a2", Sampling(8, 0.0, 1.0, None, 1.5, 0.7)),  # greedy with penalties
        Row(ids, None, Sampling(8, 0.7, 1.0, 3, 0.0, 1.0)),
        Row(ids, "a3", Sampling(6)),
    ]
    events = serve(engine, rows, logprobs=2)
    for row, ev in zip(rows, events):
        want = alone(setup, row)
        lps = [lp for e in ev[:-1] for lp in e.logprobs]
        assert [lp.token for lp in lps] == want
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.logprob - 1e-5 for lp in lps)
    assert alone(setup, rows[1]) != alone(setup, Row(ids, "a2", Sampling(8)))  # the penalty acts
    # the logprob of a greedy token is the top one, under the model's log-softmax
    ref = setup["ref"]
    with torch.no_grad(), lorakit.mixed.adapter_rows(ref, ["a3"]):
        logits = ref(torch.tensor([ids])).logits[0, -1].float()
    first = [lp for e in events[3][:-1] for lp in e.logprobs][0]
    assert first.logprob == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-4)


def test_token_cap_holds(setup, one_thread):
    tok = setup["tok"]
    ids = prompt_ids(tok, "Fair", chat=False)
    engine = engine_for(setup, max_batch=8, max_batch_tokens=len(ids) + 6)  # one row fits at a time
    rows = [Row(ids, "a1", Sampling(6)) for _ in range(3)] + [Row(ids, "a2", Sampling(6))]
    events = serve(engine, rows, gap_s=0)
    assert engine.max_rows_seen == 1
    for row, ev in zip(rows, events):
        assert "".join(e.piece for e in ev[:-1]) == alone_text(setup, row)


def test_bad_row_fails_alone_and_embedding_adapter_joins(setup, tmp_path, one_thread):
    emb = make_embedding_adapter(setup["folder"], tmp_path / "emb", 5)
    model, tok = lorakit.hf.load_model(setup["folder"])
    engine = Engine(model, tok, AdapterCache(model, {"a1": setup["paths"]["a1"], "emb": emb}), max_batch=8)
    ids = prompt_ids(tok, "Fine", chat=False)
    rows = [Row(ids, "a1", Sampling(5)), Row([10**7], None, Sampling(5)), Row(ids, "emb", Sampling(5))]
    good, bad, embedded = serve(engine, rows, gap_s=0)
    assert isinstance(bad[-1], Failed) and bad[-1].status == 500
    assert [e.piece for e in good[:-1]] and isinstance(good[-1], Done)
    assert "".join(e.piece for e in good[:-1]) == alone_text(setup, rows[0])
    ref, _ = lorakit.hf.load_model(setup["folder"])
    lorakit.load_adapter(ref, emb, "emb")
    assert "".join(e.piece for e in embedded[:-1]) == alone_text({**setup, "ref": ref}, rows[2])


@pytest.mark.slow
def test_random_load_many_rows(setup, one_thread):
    """A bounded random mix: 30 requests, random adapters, prompts and lengths, random gaps."""
    tok = setup["tok"]
    rng = random.Random(0)
    engine = engine_for(setup, max_batch=6, prefill_chunk=24)
    rows = [
        Row(
            prompt_ids(tok, " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 3))), chat=False),
            rng.choice([None, "a1", "a2", "a3"]),
            Sampling(rng.randint(1, 12)),
        )
        for _ in range(30)
    ]
    events = serve(engine, rows, gap_s=0.005)
    wrong = [
        i
        for i, (row, ev) in enumerate(zip(rows, events))
        if "".join(e.piece for e in ev[:-1]) != alone_text(setup, row)
    ]
    assert not wrong


def drain(loop, job) -> list:
    """The events the engine queued for `job` (its loop is driven by hand here)."""
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def test_a_prompt_rides_along_with_the_decoding_rows(setup):
    """Steps driven by hand: a prompt that arrives while another request decodes is prefilled in
    the same forward as that request's next token, chunk by chunk, and both answer as alone."""
    tok = setup["tok"]
    engine = engine_for(setup, max_batch=4, prefill_chunk=8)
    sched, loop = engine._loop, asyncio.new_event_loop()
    lengths = []
    engine.model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    short, long = prompt_ids(tok, "Hi", chat=False), prompt_ids(tok, PROMPTS[1], chat=False)
    assert len(short) <= 8 < len(long) - 8
    a, b = Job(Row(short, "a1", Sampling(12)), loop), Job(Row(long, "a2", Sampling(3)), loop)

    for name in ("a1", "a2"):  # loaded up front: no loader thread in this test
        engine.cache.load(name)

    def step():
        sched.admit()
        with engine.lock:
            sched.step()

    engine.submit(a)
    step()  # a's whole prompt, then its first token
    assert lengths == [len(short)] and sched.seqs[0].history
    engine.submit(b)
    while sched.rows():
        step()
    # a's decode token beside b's first and second chunks, then beside the rest, then decode tokens
    assert lengths[1:4] == [1 + 8, 1 + 8, 1 + len(long) - 16]
    assert set(lengths[4:]) == {1, 2}
    for job in (a, b):
        events = drain(loop, job)
        assert isinstance(events[-1], Done)
        assert "".join(e.piece for e in events[:-1]) == alone_text(setup, job.row)


def test_adapter_on_the_output_head_served_one_adapter_per_step(setup, tmp_path, one_thread):
    """An adapter that wraps the output head cannot be routed per token (the packed forward keeps
    some positions' logits only): the adapters take turns, each step one adapter's rows, and every
    request still answers as alone."""
    model, tok = lorakit.hf.load_model(setup["folder"])
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    lorakit.save_adapter(model, tmp_path / "head")
    ref = setup["ref"]
    lorakit.load_adapter(ref, tmp_path / "head", "head")
    engine = Engine(
        *(m := lorakit.hf.load_model(setup["folder"])),
        AdapterCache(m[0], {**setup["paths"], "head": tmp_path / "head"}),
        max_batch=4,
    )
    ids = prompt_ids(tok, "Count: one two", chat=False)
    rows = [Row(ids, "a1", Sampling(6)), Row(ids, "head", Sampling(6)), Row(ids, "a2", Sampling(6))]
    events = serve(engine, rows, gap_s=0)
    assert not engine._loop.mixable
    assert engine.max_rows_seen == 1
    for row, ev in zip(rows, events):
        assert "".join(e.piece for e in ev[:-1]) == alone_text(setup, row)


def test_an_empty_prompt_fails_alone(setup):
    engine = engine_for(setup, max_batch=2)
    ok = Row(prompt_ids(setup["tok"], "Fine", chat=False), "a1", Sampling(3))
    empty, good = serve(engine, [Row([], None, Sampling(3)), ok], gap_s=0)
    assert isinstance(empty[-1], Failed) and empty[-1].status == 400 and "empty" in empty[-1].message
    assert "".join(e.piece for e in good[:-1]) == alone_text(setup, ok)
