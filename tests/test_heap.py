"""lorakit._heap: giving freed heap back to the OS during CPU training."""

from __future__ import annotations

import re
from pathlib import Path

import fixtures
import pytest
import torch

import lorakit
from lorakit import _heap as heap
from lorakit.modeling import decoder_layers

glibc = pytest.mark.skipif(not heap._libc_malloc_trim(), reason="needs glibc's malloc_trim")


def _rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


@glibc
def test_release_freed_memory_returns_holes_in_the_heap():
    """100 KB blocks stay on the heap (below glibc's smallest mmap threshold); keeping every tenth
    leaves 90% of them as free holes that glibc keeps resident until trimmed."""
    blocks = [torch.ones(25_000) for _ in range(2_000)]  # 200 MB
    kept = blocks[::10]
    del blocks
    before = _rss_bytes()
    heap.release_freed_memory()
    assert before - _rss_bytes() > 100 * 2**20
    assert len(kept) == 200


@glibc
def test_trimmer_spends_at_most_its_share_of_the_time(monkeypatch):
    # a fake clock, so the test does not depend on how busy the machine is
    now = [0.0]
    monkeypatch.setattr(heap.time, "perf_counter", lambda: now[0])
    calls = []

    def trim():  # a trim that takes 10 ms
        calls.append(1)
        now[0] += 0.01

    monkeypatch.setattr(heap, "release_freed_memory", trim)
    trimmer = heap.HeapTrimmer(max_overhead=0.25)  # after a 10 ms trim, the next one after 40 ms
    trimmer()
    now[0] += 0.039
    trimmer()  # too soon: skipped
    assert len(calls) == 1
    now[0] += 0.002
    trimmer()
    assert len(calls) == trimmer.trims == 2
    off = heap.HeapTrimmer(enabled=False)
    off()
    assert len(calls) == 2 and off.trims == 0


@glibc
@pytest.mark.parametrize("checkpointing", [False, True])
def test_heap_trimming_hooks_every_layer_forward_and_backward(monkeypatch, checkpointing):
    calls = []
    monkeypatch.setattr(heap, "release_freed_memory", lambda: calls.append(1))
    model = lorakit.inject(
        fixtures.tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear")
    ).train()
    if checkpointing:
        from lorakit.train.run import enable_checkpointing

        enable_checkpointing(model)
    ids = torch.randint(0, 128, (2, 8))
    layers = model.config.num_hidden_layers
    trimmer = heap.HeapTrimmer(max_overhead=1.0)  # every request trims (the stub takes no time)
    with heap.heap_trimming(decoder_layers(model), trimmer):
        with torch.no_grad():
            model(input_ids=ids)
        assert calls == []  # evaluation is left alone
        loss = model(input_ids=ids, labels=ids).loss
        assert len(calls) == layers
        loss.backward()
        assert len(calls) == 2 * layers  # and as the backward reaches each block's output
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2 * layers  # hooks removed on exit


def test_heap_trimming_disabled_hooks_nothing():
    model = fixtures.tiny_llama()
    trimmer = heap.HeapTrimmer(enabled=False)
    with heap.heap_trimming(decoder_layers(model), trimmer):
        assert not any(layer._forward_hooks for layer in model.model.layers)
        trimmer()
    assert trimmer.trims == 0
