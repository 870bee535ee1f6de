"""lorakit.train.outputs: one run per output folder (refused without --resume/--overwrite), a
resume refused when it changes what the checkpoint means, leftovers of killed writers removed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.errors import ConfigError
from lorakit.train import TrainConfig
from lorakit.train.config import save_resolved
from lorakit.train.outputs import check_output, claim_output


def _cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{"data": "d.jsonl", "output": str(out), "r": 8, "lr": 1e-3, **kw}).validate()


def _a_run(out, **kw):
    """A folder holding a finished run: its config, a checkpoint, metrics and an adapter."""
    save_resolved(_cfg(out, **kw), out)
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    return out


def test_a_new_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    out = _a_run(tmp_path / "o")
    with pytest.raises(ConfigError, match=r"already holds a run \(train_config.yaml, adapter, checkpoints"):
        check_output(_cfg(out))
    with pytest.raises(ConfigError, match="pass --resume to continue it, --overwrite to replace it"):
        check_output(_cfg(out))
    assert (out / "checkpoints" / "step-0000002").is_dir()  # nothing touched


def test_an_empty_or_missing_folder_is_fine(tmp_path):
    check_output(_cfg(tmp_path))  # exists, empty
    check_output(_cfg(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # checking writes nothing
    assert claim_output(_cfg(tmp_path / "new")).is_dir()


def test_overwrite_removes_the_old_runs_checkpoints_and_metrics_but_keeps_its_adapter(tmp_path):
    out = _a_run(tmp_path / "o")
    cfg = _cfg(out, overwrite=True)
    check_output(cfg)
    assert (out / "checkpoints").is_dir()  # nothing removed before the run is ready to start
    claim_output(cfg)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "train_config.yaml").exists()
    assert (out / "adapter" / "adapter_config.json").is_file()  # replaced whole at the end of the run


def test_resume_with_changed_fixed_settings_lists_them(tmp_path):
    out = _a_run(tmp_path / "o")
    changed = _cfg(out, resume=True, r=4, data="other.jsonl", batch_size=16)
    with pytest.raises(ConfigError) as err:
        check_output(changed)
    message = str(err.value)
    for part in ("--data 'd.jsonl' -> 'other.jsonl'", "--lora-rank 8 -> 4", "--batch-size 8 -> 16"):
        assert part in message
    assert "lr" not in message.split("differ")[1].split("They")[0]


def test_resume_may_change_steps_time_and_lr(tmp_path):
    out = _a_run(tmp_path / "o")
    check_output(_cfg(out, resume=True, lr=5e-4, max_steps=90, max_minutes=3.0, eval_every=5))


def test_output_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"--output .*f is a file; give a folder"):
        check_output(_cfg(f))


def test_leftovers_of_killed_writers_are_removed_on_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)  # a process that has exited: its temporary folders are stale
    out = tmp_path / "o"
    stale = [out / f".adapter.tmp-{pid}-0", out / "checkpoints" / f".step-0000004.tmp-{pid}-1"]
    live = out / "checkpoints" / f".step-0000006.tmp-{os.getpid()}-0"  # a live writer's: kept
    for folder in (*stale, live):
        folder.mkdir(parents=True)
    check_output(_cfg(out, resume=True))
    assert not any(p.exists() for p in stale) and live.exists()
