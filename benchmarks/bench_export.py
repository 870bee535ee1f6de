"""Peak memory of an export: lorakit's streaming GGUF writer beside transformers' `save_pretrained`.

Each variant runs in a fresh process: load SmolLM2-135M-Instruct (fp32) with a random rank-16 LoRA on
every linear layer, then export. A thread samples the process's resident memory (RSS, psutil) every
2 ms during the export; the table reports the peak above the RSS just before the export started
(every weight paged in first), beside the size of the file(s) written. Variants:

- `gguf f16`, `gguf q8_0`: `lorakit.export.export_gguf` (streams one merged tensor at a time);
- `hf fp32 (save_pretrained)`: `lorakit.export.export_hf` (merges in place, then transformers'
  `save_pretrained` writes the safetensors folder).

Usage: python benchmarks/bench_export.py [--rounds 2]; results in benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = ["gguf f16", "gguf q8_0", "hf fp32 (save_pretrained)"]


def _worker(variant: str, out: Path) -> dict:
    import psutil
    import torch

    import lorakit
    import lorakit.hf
    from lorakit.export import export_gguf, export_hf

    torch.set_num_threads(2)
    model, tok = lorakit.hf.load_model("smollm2-135m")
    lorakit.inject(
        model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():  # page in every weight (safetensors loads are mmapped) so RSS starts at the model
        for t in model.state_dict().values():
            t.float().sum()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if variant.startswith("gguf"):
        target = export_gguf(model, tok, out / "m.gguf", type=variant.split()[1])
    else:
        target = export_hf(model, tok, out / "hf", dtype="fp32")
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    files = [target] if target.is_file() else [p for p in target.iterdir() if p.suffix == ".safetensors"]
    return {
        "variant": variant,
        "rss_before_mb": before / 2**20,
        "peak_above_before_mb": (peak[0] - before) / 2**20,
        "output_mb": sum(p.stat().st_size for p in files) / 2**20,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-export-") as tmp:
            print(json.dumps(_worker(args.worker, Path(tmp))))
        return 0
    runs: list[dict] = []
    for round_ in range(args.rounds):
        for variant in VARIANTS:  # interleaved, one fresh process each
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", variant], capture_output=True, text=True, check=True
            )
            runs.append({"round": round_, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(runs, indent=2))
    print(
        "\n| variant | output MB | peak RSS above the loaded model, MB (min / median / max) | seconds (median) |"
    )
    print("| --- | --- | --- | --- |")
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        peaks = [r["peak_above_before_mb"] for r in rows]
        print(
            f"| {variant} | {rows[0]['output_mb']:.0f} | {min(peaks):.0f} / {statistics.median(peaks):.0f} / "
            f"{max(peaks):.0f} | {statistics.median(r['seconds'] for r in rows):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
