"""lorakit.train.report: the metrics log and the plot."""

from __future__ import annotations

from lorakit.train.report import MetricsLog, plot_training, read_metrics


def test_resuming_a_finished_run_without_a_log_still_plots(tmp_path):
    """A run that takes no step (its checkpoint is the last one) writes no row: the log must exist."""
    log = MetricsLog(tmp_path)
    log.start(7)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert plot_training(tmp_path / "metrics.jsonl", tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resume_drops_rows_written_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    log.start(0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    MetricsLog(tmp_path).start(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
