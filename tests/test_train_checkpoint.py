"""lorakit.train.checkpoint: atomic checkpoints, keep-last-k, exact restore, refusal of others."""

from __future__ import annotations

import os
import random
import stat

import pytest
import torch
from fixtures import lm_examples
from fixtures import lora4 as lora
from fixtures import pad_right as collate
from fixtures import train_llama as tiny_llama
from fixtures import trainable_tensors as adapter_tensors

import lorakit
from lorakit.errors import ShapeMismatchError
from lorakit.train import loss_sum
from lorakit.train.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- checkpoints


def _optimizer_and_scheduler(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


_NEEDS_DEV_FULL = pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
    reason="needs /dev/full (a device whose every write fails with ENOSPC)",
)


def test_checkpoints_keep_last_k_and_ignore_half_written(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    (tmp_path / "step-0000009").mkdir()  # killed before its marker: not complete
    (tmp_path / ".step-0000010.tmp-123").mkdir()  # killed mid-write
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    assert (tmp_path / "step-0000003" / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_restores_params_optimizer_and_rng(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    batch = collate(lm_examples(4))
    loss_sum(model, batch).backward()
    opt.step()
    saved = adapter_tensors(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1, "epoch": 0, "position": 1, "tokens": 9})
    expected_draw = (torch.rand(3), random.random())
    other = lora(tiny_llama(seed=1))
    opt2, sched2 = _optimizer_and_scheduler(other)
    progress = load_checkpoint(latest_checkpoint(tmp_path), other, opt2, sched2)
    assert progress["position"] == 1
    assert (torch.rand(3), random.random())[1] == expected_draw[1]
    for name, value in adapter_tensors(other).items():
        assert torch.equal(value, saved[name])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    other = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt2, sched2 = _optimizer_and_scheduler(other)
    with pytest.raises(ShapeMismatchError, match="other trainable parameters"):
        load_checkpoint(latest_checkpoint(tmp_path), other, opt2, sched2)


def test_a_non_finite_tensor_is_never_saved_as_a_checkpoint(tmp_path):
    from lorakit.errors import TrainingError

    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=rf"step 2: trainable tensor '{name}' holds NaN or Inf"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001"]  # no partial folder either
    assert latest_checkpoint(tmp_path).name == "step-0000001"


@_NEEDS_DEV_FULL
def test_disk_full_is_a_storage_error_naming_the_path_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    """The state file's bytes go to /dev/full, which fails every write with ENOSPC like a full disk."""
    from pathlib import Path

    from lorakit.errors import StorageError

    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(Path("/dev/full"), data))
    with pytest.raises(StorageError, match=r"cannot write .*step-0000002: no space left on device"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001"]  # the temporary folder is gone
    assert latest_checkpoint(tmp_path).name == "step-0000001"


def test_a_rerun_of_a_step_replaces_its_checkpoint_whole(tmp_path):
    model = lora(tiny_llama())
    opt, sched = _optimizer_and_scheduler(model)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    (tmp_path / "step-0000001" / "stray.txt").write_text("from the older write")
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1, "position": 5})
    assert not (tmp_path / "step-0000001" / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]
