"""Tables for people: `lorakit plan`'s text output."""

from __future__ import annotations

from .estimate import Estimate
from .recommend import Recommendation
from .units import count, decimal, human


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(chosen: Estimate, all_methods: dict[str, Estimate]) -> str:
    """The report: the chosen setup in detail, then every method side by side."""
    s = chosen.setup
    targets = s.target_modules if isinstance(s.target_modules, str) else " ".join(s.target_modules)
    if s.target_parameters:
        targets += f" + parameters {' '.join(s.target_parameters)}"
    lines = [
        f"model {s.model}: {count(chosen.total_params)} parameters, dtype {s.dtype}",
        f"setup: {s.method}"
        + ("" if s.method == "full" else f", r={s.r}, targets {targets} ({len(chosen.targets)} targets)")
        + f", batch {s.batch_size} x {s.seq_len} tokens, {s.optimizer}, attention {s.attention}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, device {s.device}"
        + (f", FSDP over {s.fsdp} processes (memory per process)" if s.fsdp > 1 else ""),
        f"trainable: {count(chosen.trainable_params)} = {100 * chosen.trainable_ratio:.4f}% of all parameters",
        "weights: " + ", ".join(f"{k} {human(v)}" for k, v in chosen.weights_by_dtype.items()),
    ]
    if chosen.adapter_bytes is not None:
        ratio = chosen.checkpoint_bytes / chosen.adapter_bytes
        lines.append(
            f"adapter file: {decimal(chosen.adapter_bytes)} in {s.adapter_dtype or 'float32'} "
            f"(full {s.dtype} checkpoint {decimal(chosen.checkpoint_bytes)}, {ratio:,.0f}x smaller)"
        )
    lines.append("")
    names = list(all_methods)
    rows = [["", *names]]
    rows.append(["trainable params", *(f"{all_methods[m].trainable_params:,}" for m in names)])
    for label, attr in (
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer state", "optimizer"),
        ("activations", "activations"),
        ("workspace", "workspace"),
        ("runtime", "runtime"),
        ("predicted peak", "peak"),
    ):
        rows.append([label, *(human(getattr(all_methods[m].memory, attr)) for m in names)])
    rows.append(["peak during", *(all_methods[m].memory.peak_phase for m in names)])
    full = all_methods.get("full")
    if full:
        rows.append(
            ["peak vs full", *(f"{all_methods[m].memory.peak / full.memory.peak:.2f}x" for m in names)]
        )
    lines.append(_table(rows))
    if s.device == "cpu":
        lines.append(CPU_RSS_NOTE)
    return "\n".join(lines)


# measured by benchmarks/bench_plan_memory.py (docs/plan.md, "Checked against real training")
CPU_RSS_NOTE = (
    "CPU: the peak counts live tensors. Process RSS stays near it with `lorakit train --trim-heap`; "
    "with glibc's defaults, freed heap stays resident (RSS measured 1.1-1.7x the prediction)."
)


def render_recommendation(rec: Recommendation) -> str:
    """One paragraph: the recommended settings and their peak, or why nothing fits."""
    if rec.setup is None:
        return f"budget {human(rec.budget)}: {rec.reason}"
    s, m = rec.setup, rec.estimate.memory
    flags = f"--method {s.method} --batch-size {s.batch_size}" + ("" if s.method == "full" else f" --r {s.r}")
    flags += " --gradient-checkpointing" if s.gradient_checkpointing else ""
    cpu = "; on CPU, train with --trim-heap to stay near that peak" if s.device == "cpu" else ""
    return (
        f"budget {human(rec.budget)}: recommended {flags} (predicted peak {human(m.peak)}, "
        f"{100 * m.peak / rec.budget:.0f}% of the budget); {rec.reason}{cpu}"
    )
