"""What a run leaves to look at: `metrics.jsonl` (one JSON object per logged step or evaluation),
TensorBoard event files when `tensorboard` is installed, and `training.png`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .._atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends metric rows to `folder/metrics.jsonl` (and TensorBoard); a no-op when not `enabled`."""

    def __init__(self, folder: str | Path, enabled: bool = True) -> None:
        self.path = Path(folder) / METRICS
        self.enabled = enabled
        self._tb = None

    def start(self, step: int) -> None:
        """Open the log; rows past `step` (written after the checkpoint a resume starts from) go."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if step else []
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            self.path.touch()  # a run that takes no step (resuming a finished one) still has its log
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=step or None)

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append `row` (a dict with "step"); returns it."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(key, value, row["step"])
        return row

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (a torn last line, from a kill mid-write, is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


TASK_METRICS = (
    "eval_exact_match",
    "eval_label_match",
    "eval_choice_accuracy",
    "eval_accuracy",
    "eval_macro_f1",
    "eval_rewards/accuracies",  # preference methods (lorakit.train.preference)
)


def plot_training(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draw train/eval loss and the task metric (accuracy, F1 or exact match) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in rows if "eval_loss" in r]
    names = [m for m in TASK_METRICS if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(11 if names else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="eval loss",
            color="tab:orange",
        )
    values = [v for _, v in train] + [r["eval_loss"] for r in evals]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # the base model's loss would flatten the training curve
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if names:
        ax = axes[0][1]
        for name in names:
            pts = [(r["step"], r[name]) for r in rows if name in r]
            ax.plot(*zip(*pts), "o-", label=name.removeprefix("eval_").replace("_", " "))
            ax.annotate(f"{pts[-1][1]:.3f}", pts[-1], textcoords="offset points", xytext=(-28, 6))
        ax.set(xlabel="step (0 = base model)", ylabel="score", title="Evaluation", ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(png_path)
