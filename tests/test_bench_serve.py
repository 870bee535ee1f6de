"""The serving benchmark's own arithmetic: its workload and the throughput-at-the-same-p99 table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve  # noqa: E402
import bench_serve_steps  # noqa: E402
from fixtures import make_adapter, tiny_chat_model, tiny_llama  # noqa: E402

import lorakit  # noqa: E402
import lorakit.hf  # noqa: E402
from lorakit.serve import AdapterCache  # noqa: E402


def row(batching, rate, tokens_per_s, p99, adapters=8):
    return {
        "batching": batching,
        "rate": rate,
        "adapters": adapters,
        "tokens_per_s": tokens_per_s,
        "ttft_p99_s": p99,
    }


def test_at_same_p99_takes_each_batchings_best_rate_within_each_latency():
    rows = [
        row("static", 0.5, 4.0, 3.0),
        row("static", 1.0, 7.0, 6.0),
        row("static", 2.0, 6.5, 9.0),  # saturated: less throughput at a higher rate
        row("static", 2.0, 99.0, 1.0, adapters=1),  # other adapters: a table of its own
        row("continuous", 1.0, 8.0, 2.0),
        row("continuous", 2.0, 10.0, 6.5),
    ]
    table = [
        (t["adapters"], t["ttft_p99_s"], t["continuous"], t["static"], t["ratio"])
        for t in bench_serve.at_same_p99(rows)
    ]
    assert table == [
        (1, 1.0, None, 99.0, None),
        (8, 2.0, 8.0, None, None),
        (8, 3.0, 8.0, 4.0, 2.0),
        (8, 6.0, 8.0, 7.0, 8.0 / 7.0),
        (8, 6.5, 10.0, 7.0, 10.0 / 7.0),
        (8, 9.0, 10.0, 7.0, 10.0 / 7.0),
    ]


def test_workload_is_fixed_by_the_seed_and_keeps_the_output_range():
    a = bench_serve.workload(3, 2.0, 50, ["x", "y"], (8, 64))
    assert a == bench_serve.workload(3, 2.0, 50, ["x", "y"], (8, 64))
    assert all(8 <= r["max_tokens"] <= 64 for r in a) and {r["model"] for r in a} == {"x", "y"}
    assert all(b["at"] > a_["at"] for a_, b in zip(a, a[1:]))


def test_spread_steps_times_each_kind_for_each_row_count():
    model = tiny_llama()
    for name in ("a", "b"):
        lorakit.inject(
            model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name
        )
    out = bench_serve_steps.spread_steps(model, ["a", "b"], rounds=1, prompt_len=4)
    assert list(out) == ["1", "2"]
    for kinds in out.values():
        assert all(kinds[k] > 0 for k in ("base", "one adapter", "own adapter"))
        assert kinds["own / one"] == kinds["own adapter"] / kinds["one adapter"]


def test_packed_steps_times_the_chunk_with_and_apart_from_the_decode_step():
    model = tiny_llama()
    for name in ("a", "b"):
        lorakit.inject(
            model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name
        )
    out = bench_serve_steps.packed_steps(model, ["a", "b"], rounds=1, chunks=(3,), past=4)
    assert list(out) == ["3"]
    kinds = out["3"]
    assert all(kinds[k] > 0 for k in ("one forward", "decode step", "prompt forward"))
    assert kinds["one / two"] == kinds["one forward"] / (kinds["decode step"] + kinds["prompt forward"])


def test_saturated_serves_every_request_with_each_batching(tmp_path):
    folder = tiny_chat_model(tmp_path / "model")
    paths = {f"a{i}": make_adapter(folder, tmp_path / f"a{i}", i) for i in (1, 2)}
    model, tok = lorakit.hf.load_model(folder)
    reqs = bench_serve.workload(0, 1.0, 5, list(paths), (2, 4))
    out = bench_serve_steps.saturated(
        model, tok, AdapterCache(model, paths), reqs, ["continuous", "static"], 1, 2
    )
    for b in ("continuous", "static"):
        assert len(out[b]["tokens_per_s"]) == 1 and out[b]["median"] > 0
