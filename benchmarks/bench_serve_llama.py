"""llama.cpp on `bench_serve.py`'s load: the outside reference (optional: needs `llama-cpp-python`).

The base model is exported with `lorakit.export.export_gguf` and each adapter with
`export_gguf_lora`; one `llama_cpp.Llama` holds the base, every LoRA is loaded once
(`llama_adapter_lora_init`) and each request switches the context to its own adapter
(`llama_set_adapters_lora`), as llama.cpp's server does for a request with another LoRA set: it
never batches requests with different LoRAs, and llama-cpp-python's server runs one request at a
time. So requests are served one after another, in arrival order, from a thread; the records
have `bench_serve.summarize`'s fields (no HTTP in between: loopback adds little beside seconds per
step, and it favours llama.cpp).
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from pathlib import Path

import lorakit
import lorakit.hf
from lorakit.export.gguf import export_gguf
from lorakit.export.gguf_lora import export_gguf_lora


def missing() -> str | None:
    """Why the llama.cpp backend cannot run here (None: it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama_cpp is not installed ({e}); pip install llama-cpp-python to add llama.cpp's rows"
    return None


def export(model, keys: dict[str, str], folder: Path, type: str) -> tuple[Path, dict[str, Path]]:
    """The base GGUF (`type`) and one f32 gguf-lora per adapter (`keys`: served name -> the
    adapter's key on `model`), written once into `folder` and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"base-{type}.gguf"
    if not base.exists():
        plain, tok = lorakit.hf.load_model("smollm2-135m")
        export_gguf(plain, tok, base, type=type)
        del plain
    loras = {}
    for name, key in keys.items():
        loras[name] = folder / f"{name}.gguf"
        if not loras[name].exists():
            lorakit.set_adapter(model, key)
            export_gguf_lora(model, loras[name])
    return base, loras


class LlamaServer:
    """One llama.cpp model with every LoRA loaded; `run` serves a workload serially."""

    def __init__(self, base: Path, loras: dict[str, Path], threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            str(base), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.adapters = {}
        for name, path in loras.items():
            adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if adapter is None:
                raise RuntimeError(f"llama.cpp could not load the LoRA {path}")
            self.adapters[name] = adapter

    def use(self, name: str | None) -> None:
        """Switch the context to adapter `name` (None: the base alone)."""
        lib = self.lib
        if name is None:
            lib.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            if lib.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise RuntimeError(f"llama.cpp could not switch to the LoRA {name}")
        self.llm.reset()  # the cached prompt prefix was computed under the previous adapter

    def run(self, reqs: list[dict], budget_s: float) -> tuple[list[dict], float, float]:
        """Serve `reqs` (arrival times `at`) one at a time for at most `budget_s` seconds; the
        records, the seconds it took and the time of the cut (as `bench_serve.drive`)."""
        records: list[dict] = [{} for _ in reqs]
        start = time.monotonic()
        end = start + budget_s
        arrived: queue.Queue = queue.Queue()

        def arrive() -> None:
            for i, r in enumerate(reqs):
                time.sleep(max(0.0, start + r["at"] - time.monotonic()))
                if time.monotonic() >= end:
                    return
                records[i].update(sent=time.monotonic(), stamps=[], tokens=0, done=False)
                arrived.put(i)

        clock = threading.Thread(target=arrive, daemon=True)
        clock.start()
        served = 0
        while served < len(reqs) and time.monotonic() < end:
            try:
                i = arrived.get(timeout=0.2)
            except queue.Empty:
                continue
            served += 1
            self.one(reqs[i], records[i], end)
        clock.join(timeout=1)
        return [r for r in records if r], time.monotonic() - start, end

    def one(self, req: dict, record: dict, end: float) -> None:
        self.use(req["model"])
        stream = self.llm.create_chat_completion(
            [{"role": "user", "content": req["prompt"]}],
            max_tokens=req["max_tokens"],
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                record["stamps"].append(time.monotonic())
            if chunk["choices"][0].get("finish_reason"):
                record.update(tokens=len(record["stamps"]), done=True)
            if time.monotonic() >= end:
                break
