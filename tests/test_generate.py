"""lorakit.generate: equals transformers' greedy generate, batch rows equal rows alone (left padding,
mixed adapters, rows leaving the batch), seeded sampling, EOS/length/cancel, streaming text, CLI."""

import io

import pytest
import torch
from fixtures import make_adapter, make_embedding_adapter, tiny_chat_model

import lorakit
import lorakit.hf
from lorakit.cli import main
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.generate import (
    Row,
    Sampling,
    TextStream,
    eos_ids,
    generate_text,
    generate_tokens,
    load_for_inference,
    prompt_ids,
    split_adapter_spec,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    folder = tiny_chat_model(d / "model")
    adapters = {"a1": make_adapter(folder, d / "a1", 1), "a2": make_adapter(folder, d / "a2", 2, r=8)}
    model, tok = lorakit.hf.load_model(folder)
    model.eval()
    for name, path in adapters.items():
        lorakit.load_adapter(model, path, name)
    return folder, adapters, model, tok


def run_rows(model, tok, rows, **kw):
    out = {i: [] for i in range(len(rows))}
    reasons = {}
    for i, token, reason in generate_tokens(model, rows, eos_ids(model, tok), tok.pad_token_id, **kw):
        if token is not None:
            out[i].append(token)
        else:
            reasons[i] = reason
    return out, reasons


@torch.no_grad()
def test_greedy_equals_transformers_generate(setup):
    _, _, model, tok = setup
    ids = prompt_ids(tok, "Tell me a story")
    for adapter in (None, "a2"):
        out, reasons = run_rows(model, tok, [Row(ids, adapter, Sampling(max_tokens=12))])
        if adapter is None:
            with lorakit.disable_adapters(model):
                ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        else:
            lorakit.set_adapter(model, adapter)
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        expected = ref[0, len(ids) :].tolist()
        if expected[-1] in eos_ids(model, tok):
            expected = expected[:-1]
        assert out[0] == expected
        assert reasons[0] in ("length", "stop")


def test_batch_rows_equal_rows_alone(setup):
    _, _, model, tok = setup
    rows = [
        Row(prompt_ids(tok, "Hello"), "a1", Sampling(max_tokens=9)),
        Row(
            prompt_ids(tok, "A much longer prompt than the others, with more words"),
            "a2",
            Sampling(max_tokens=4),
        ),
        Row(prompt_ids(tok, "Base please", chat=False), None, Sampling(max_tokens=7)),
        Row(prompt_ids(tok, "Hello"), "a2", Sampling(max_tokens=9)),
        Row(prompt_ids(tok, "Sampled"), "a1", Sampling(max_tokens=6, temperature=0.8, top_p=0.9, seed=7)),
    ]
    batch, reasons = run_rows(model, tok, rows)
    for i, row in enumerate(rows):
        alone, alone_reasons = run_rows(model, tok, [row])
        assert batch[i] == alone[0], f"row {i}"
        assert reasons[i] == alone_reasons[0]
    assert [len(batch[i]) for i in (0, 1, 2)] == [9, 4, 7]  # rows stop at their own max_tokens
    assert batch[0] != batch[3]  # different adapters on the same prompt


def test_sampling_seed_and_top_p(setup):
    _, _, model, tok = setup
    ids = prompt_ids(tok, "Once upon a time")
    seeded = [run_rows(model, tok, [Row(ids, "a1", Sampling(8, 1.0, 1.0, seed=3))])[0][0] for _ in range(2)]
    assert seeded[0] == seeded[1]
    other = run_rows(model, tok, [Row(ids, "a1", Sampling(8, 1.0, 1.0, seed=4))])[0][0]
    assert other != seeded[0]
    greedy = run_rows(model, tok, [Row(ids, "a1", Sampling(8))])[0][0]
    tiny_top_p = run_rows(model, tok, [Row(ids, "a1", Sampling(8, 1.0, 1e-6, seed=5))])[0][0]
    assert tiny_top_p == greedy  # top-p keeping one token is greedy


def test_eos_and_cancel(setup):
    _, _, model, tok = setup
    ids = prompt_ids(tok, "Stop")
    first = run_rows(model, tok, [Row(ids, None, Sampling(3))])[0][0][0]
    events = list(generate_tokens(model, [Row(ids, None, Sampling(3))], {first}, 0))
    assert events == [(0, None, "stop")]
    rows = [Row(ids, "a1", Sampling(50)), Row(ids, "a2", Sampling(5))]
    steps = {"n": 0}

    def cancelled(i):
        steps["n"] += 1
        return i == 0 and steps["n"] > 4

    out, reasons = run_rows(model, tok, rows, cancelled=cancelled)
    assert reasons == {0: "cancelled", 1: "length"} and len(out[0]) < 50 and len(out[1]) == 5


def test_text_stream_pieces_join_to_the_decoded_text(setup):
    _, _, _, tok = setup
    text = "Ünïcödé ✓ 你好 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_cli_streams_the_same_text(setup, capsys):
    folder, adapters, model, tok = setup
    expected = generate_text(model, tok, "Hi", "a1", Sampling(max_tokens=10))
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--adapter",
                f"a1={adapters['a1']}",
                "--max-tokens",
                "10",
                "Hi",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    raw = generate_text(model, tok, "Hi", None, Sampling(max_tokens=5), chat=False)
    assert main(["generate", "--model", str(folder), "--raw", "--max-tokens", "5", "Hi"]) == 0
    assert capsys.readouterr().out == raw + "\n"


def test_cli_several_adapters_are_summed(setup, capsys):
    folder, adapters, model, tok = setup
    lorakit.set_adapter(model, ["a1", "a2"])  # both active: their outputs add up
    ids = prompt_ids(tok, "Hi")
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
    ref = [t for t in ref.tolist() if t not in eos_ids(model, tok)]
    args = [
        "generate",
        "--model",
        str(folder),
        "--adapter",
        str(adapters["a1"]),
        "--adapter",
        str(adapters["a2"]),
    ]
    assert main([*args, "--max-tokens", "6", "Hi"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ref, skip_special_tokens=True)


def test_errors(setup, capsys):
    folder, _, model, tok = setup
    with pytest.raises(ConfigError, match="max_tokens"):
        Sampling(max_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        list(generate_tokens(model, [Row([1, 2], "nope")], set(), 0))
    with pytest.raises(ConfigError, match="empty"):
        list(generate_tokens(model, [Row([], None)], set(), 0))
    assert main(["generate", "--model", str(folder / "missing"), "Hi"]) == 1
    assert "not found" in capsys.readouterr().err


def test_adapter_specs(tmp_path, setup, capsys):
    folder = setup[0]
    with_eq = tmp_path / "lr=1e-4"
    with_eq.mkdir()
    assert split_adapter_spec(str(with_eq)) == (None, str(with_eq))  # an existing folder, '=' and all
    assert split_adapter_spec("x=/b=c") == ("x", "/b=c")
    assert split_adapter_spec("runs/lr=1/adapter") == (None, "runs/lr=1/adapter")
    for bad, word in (
        ("my.v1=/a", "invalid adapter name 'my.v1'"),
        ("a=", "no folder"),
    ):
        with pytest.raises(ConfigError, match=word):
            split_adapter_spec(bad)
    with pytest.raises(ConfigError, match="given twice"):
        load_for_inference(str(folder), ["a=/x", "a=/y"])
    assert main(["generate", "--model", str(folder), "--adapter", "my.v1=/a", "Hi"]) == 1
    assert "invalid adapter name 'my.v1'" in capsys.readouterr().err


def test_embedding_adapter_generates_on_the_plain_path(setup, tmp_path, capsys):
    folder, adapters, model, tok = setup
    emb = make_embedding_adapter(folder, tmp_path / "emb", 3)
    lorakit.load_adapter(model, emb, "emb")
    lorakit.set_adapter(model, "emb")
    ids = prompt_ids(tok, "Hi")
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
    ref = [t for t in ref.tolist() if t not in eos_ids(model, tok)]
    lorakit.set_adapter(model, ["a1", "a2"])
    assert main(["generate", "--model", str(folder), "--adapter", str(emb), "--max-tokens", "6", "Hi"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ref, skip_special_tokens=True)
    out, _ = run_rows(model, tok, [Row(ids, "emb", Sampling(6))])
    assert out[0] == ref and lorakit.active_adapters(model) == ["a1", "a2"]  # the active set is restored
    lorakit.delete_adapter(model, "emb")


def test_bad_sampling_and_cli_inputs(setup, capsys, monkeypatch):
    folder = setup[0]
    for bad in (
        {"seed": 2**64},
        {"seed": -1},
        {"seed": 1.5},
        {"max_tokens": True},
        {"temperature": float("nan")},
    ):
        with pytest.raises(ConfigError):
            Sampling(**bad)
    Sampling(seed=2**64 - 1)
    assert main(["generate", "--model", str(folder), "--seed", "-1", "Hi"]) == 1
    assert "seed" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--raw", "--system", "Be brief", "Hi"]) == 1
    assert "--system" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    assert main(["generate", "--model", str(folder), "-"]) == 1
    assert "not UTF-8" in capsys.readouterr().err


def test_tiny_temperature_samples_like_greedy(setup):
    _, _, model, tok = setup
    ids = prompt_ids(tok, "Once upon a time")
    greedy = run_rows(model, tok, [Row(ids, "a1", Sampling(6))])[0][0]
    for t in (1e-30, 2e-91, 5e-324):  # logits / t overflow to inf: softmax(inf - inf) was NaN
        assert run_rows(model, tok, [Row(ids, "a1", Sampling(6, t, 1.0, seed=1))])[0][0] == greedy


def test_context_and_template_errors_are_clear(setup):
    _, _, model, tok = setup
    ids = prompt_ids(tok, "Hi")
    with pytest.raises(ConfigError, match="512 positions"):  # the tiny model's max_position_embeddings
        list(generate_tokens(model, [Row(ids, None, Sampling(600))], set(), 0))
    saved = tok.chat_template
    tok.chat_template = "{{ raise_exception('only user messages') }}"
    try:
        with pytest.raises(ConfigError, match="rejects these messages: only user messages"):
            prompt_ids(tok, [{"role": "tool", "content": "x"}])
    finally:
        tok.chat_template = saved


def test_embedding_adapter_in_a_mixed_batch_equals_rows_alone(setup, tmp_path):
    folder, _, model, tok = setup
    lorakit.load_adapter(model, make_embedding_adapter(folder, tmp_path / "emb", 4), "emb4")
    try:
        ids = prompt_ids(tok, "Mixed")
        rows = [Row(ids, "emb4", Sampling(6)), Row(ids, "a1", Sampling(6)), Row(ids, None, Sampling(4))]
        batch, _ = run_rows(model, tok, rows)
        for i, row in enumerate(rows):
            assert batch[i] == run_rows(model, tok, [row])[0][0], f"row {i}"
        assert batch[0] != batch[1]
    finally:
        lorakit.delete_adapter(model, "emb4")


def test_penalties_follow_the_openai_formula():
    from lorakit.generate import penalize_rows

    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    want = logits.clone()
    want[0, 3] -= 0.25 * 2 + 0.5  # seen twice: frequency * count + presence
    want[0, 5] -= 0.25 * 1 + 0.5
    both = Sampling(4, 0.0, 1.0, None, 0.5, 0.25)
    penalize_rows(logits, [both, both], [[3, 3, 5], []])  # row 1 has no history: unchanged
    assert torch.allclose(logits, want)
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"presence_penalty": True}):
        with pytest.raises(ConfigError, match="penalty"):
            Sampling(**bad)


@torch.no_grad()
def test_rows_on_one_adapter_are_routed_without_touching_the_active_set(setup):
    # the server switches adapters at every prefill: routing leaves the active adapters and every
    # trainable flag as they were, and gives what activating the adapter gives
    from lorakit.generate import adapters_for_rows

    _, _, model, tok = setup
    lorakit.set_adapter(model, "a1")
    flags = [p.requires_grad for p in model.parameters()]
    ids = torch.tensor([prompt_ids(tok, "Hi")] * 2)
    with adapters_for_rows(model, ["a2", "a2"]):
        routed = model(ids).logits
        assert lorakit.active_adapters(model) == ["a1"]
        assert [p.requires_grad for p in model.parameters()] == flags
    lorakit.set_adapter(model, "a2")
    torch.testing.assert_close(routed, model(ids).logits, atol=0, rtol=0)
    lorakit.merge(model)  # routing refuses merged adapters: the one adapter is made active instead
    with adapters_for_rows(model, ["a2", "a2"]):
        torch.testing.assert_close(model(ids).logits, routed, atol=2e-4, rtol=1e-4)  # merge rounding
    lorakit.unmerge(model)
    assert lorakit.active_adapters(model) == ["a2"]
