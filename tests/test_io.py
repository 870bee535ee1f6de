"""Adapter files: round trip, fingerprints, and every kind of bad file."""

import json

import pytest
import torch
from fixtures import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFileError, ShapeMismatchError, TargetNotFoundError
from lorakit.io import adapter_state_dict


def _trained(make=tiny_llama, **kw):
    model = lorakit.inject(
        make(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)
    )
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_and_peft_names(tmp_path, ids):
    model = _trained()
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    fp = config["lorakit_fingerprint"]["modules"]
    assert fp["model.layers.0.self_attn.v_proj"] == [32, 64]
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_named_adapters_go_to_subfolders_and_load_back(tmp_path, ids):
    model = _trained()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), "style")
    written = lorakit.save_adapter(model, tmp_path)
    assert written == [tmp_path, tmp_path / "style"]
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    lorakit.load_adapter(fresh, tmp_path / "style", "style")
    for name in ("default", "style"):
        lorakit.set_adapter(model, name)
        lorakit.set_adapter(fresh, name)
        assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_all_linear_is_saved_as_the_resolved_module_names(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    lorakit.save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 21 and "lm_head" not in targets


def test_pickle_adapters_are_refused_unless_opted_in(tmp_path, ids):
    model = _trained()
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(
        AdapterFileError, match="adapter_model.bin: refusing to read a pickle file.*allow_pickle=True"
    ):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path, allow_pickle=True)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_fingerprint_mismatch_names_the_modules(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    wider = tiny_llama(hidden_size=96)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ShapeMismatchError,
        match=r"model.layers.0.self_attn.q_proj \(adapter made for \[64, 64\], model has \[96, 96\]\)",
    ):
        lorakit.load_adapter(wider, tmp_path)
    assert not lorakit.list_adapters(wider)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


def test_fingerprint_catches_a_missing_module(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    shallow = tiny_llama(num_hidden_layers=2)
    with pytest.raises(
        ShapeMismatchError, match=r"model.layers.2.self_attn.q_proj \(missing from the model\)"
    ):
        lorakit.load_adapter(shallow, tmp_path)


def test_without_fingerprint_shapes_are_still_checked_and_nothing_is_left_behind(tmp_path, ids):
    lorakit.save_adapter(_trained(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lorakit_fingerprint"]
    config["r"] = 2  # says rank 2, tensors are rank 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    base = _logits(model, ids)
    with pytest.raises(
        ShapeMismatchError,
        match="q_proj.lora_A.weight has shape \\[4, 64\\] but the model expects \\[2, 64\\]",
    ):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.list_adapters(model)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in model.modules())
    assert torch.equal(_logits(model, ids), base)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, path)
    with pytest.raises(
        AdapterFileError,
        match=r"Missing \(1\): \['.*v_proj.lora_B.weight'\]; unexpected \(1\): \['.*k_proj.lora_B.weight'\]",
    ):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_a_failed_load_keeps_the_adapters_already_there(tmp_path, ids):
    good = _trained()
    lorakit.save_adapter(good, tmp_path / "good")
    lorakit.save_adapter(good, tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    model = lorakit.load_adapter(tiny_llama(), tmp_path / "good")
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(model, tmp_path / "bad", "other")
    assert lorakit.list_adapters(model) == ["default"]
    assert torch.equal(_logits(model, ids), _logits(good, ids))


def test_truncated_safetensors_names_the_file(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: corrupt or truncated"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_integer_tensors_are_refused(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match="dtype torch.int32"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(AdapterFileError, match="not an adapter folder"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_other_architecture_fails_before_touching_the_model(tmp_path):
    lorakit.save_adapter(_trained(), tmp_path)
    model = tiny_gpt2()
    with pytest.raises(ShapeMismatchError, match="missing from the model"):
        lorakit.load_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lorakit_fingerprint"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TargetNotFoundError, match="matches no module of GPT2LMHeadModel"):
        lorakit.load_adapter(model, tmp_path)


def test_a_crash_mid_save_leaves_the_previous_adapter_intact(tmp_path, ids, monkeypatch):
    model = _trained()
    lorakit.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        adapter_state_dict(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].add_(1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either
    assert lorakit.list_adapters(lorakit.load_adapter(tiny_llama(), tmp_path)) == ["default"]


# the folder you name, both layouts ---------------------------------------------------------------


def test_one_named_adapter_is_saved_in_the_folder_named(tmp_path, ids):
    model = lorakit.inject(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "alpha"
    )
    assert lorakit.save_adapter(model, tmp_path / "alpha", adapter="alpha") == [tmp_path / "alpha"]
    assert (tmp_path / "alpha" / "adapter_config.json").is_file()
    assert not (tmp_path / "alpha" / "alpha").exists()
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path / "alpha", "alpha")
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_loaders_accept_the_nested_layout(tmp_path, ids):
    """PEFT's layout (path/<name>/adapter_config.json) loads with `path` and the name."""
    model = _trained()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), "style")
    lorakit.save_adapter(model, tmp_path)  # several: default in tmp_path, style in tmp_path/style
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path, "style")
    lorakit.set_adapter(model, "style")
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_saving_one_adapter_keeps_the_sibling_adapter_folders(tmp_path, ids):
    model = _trained()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), "style")
    lorakit.save_adapter(model, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    style = (tmp_path / "style" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        adapter_state_dict(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].add_(1.0)
    lorakit.save_adapter(model, tmp_path, "default")
    assert (tmp_path / "style" / "adapter_model.safetensors").read_bytes() == style
    assert (tmp_path / "notes.txt").read_text() == "mine"
    lorakit.set_adapter(model, "default")
    assert torch.equal(_logits(lorakit.load_adapter(tiny_llama(), tmp_path), ids), _logits(model, ids))
    lorakit.load_adapter(tiny_llama(), tmp_path, "style")


# all-or-nothing saves ----------------------------------------------------------------------------

_KILLED_SAVE = """
import os, sys
sys.path.insert(0, sys.argv[2])
import lorakit, lorakit.io
from fixtures import tiny_llama

model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=8, target_modules=["q_proj", "k_proj"]))
real_dumps = lorakit.io.json.dumps


class KillAtConfig:  # the weights are written; die (no cleanup, like SIGKILL) at the config
    def __getattr__(self, name):
        return getattr(__import__("json"), name)

    def dumps(self, *args, **kwargs):
        os._exit(9)


lorakit.io.json = KillAtConfig()
lorakit.save_adapter(model, sys.argv[1])
"""


def test_a_kill_mid_save_leaves_the_old_adapter_whole_and_the_next_save_cleans_up(tmp_path, ids):
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "out"
    model = _trained()
    lorakit.save_adapter(model, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tests = str(Path(__file__).parent)
    root = str(Path(__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(folder), tests], cwd=root, env={"PYTHONPATH": root}
    )
    assert done.returncode == 9
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert torch.equal(_logits(lorakit.load_adapter(tiny_llama(), folder), ids), _logits(model, ids))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # the dead save's
    lorakit.save_adapter(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_says_so_names_the_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from lorakit.errors import StorageError

    folder = tmp_path / "out"
    model = _trained()
    lorakit.save_adapter(model, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC (measured)
        with open(filename, "wb") as f:
            f.write(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("lorakit.io.save_file", full)
    with pytest.raises(StorageError, match=f"cannot write {folder}: no space left on device"):
        lorakit.save_adapter(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp leftovers


# refused before anything changes -----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensors_are_refused_on_load(tmp_path, value):
    lorakit.save_adapter(_trained(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = value
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match=f"{key} holds NaN or Inf"):
        lorakit.load_adapter(model, tmp_path)
    assert lorakit.list_adapters(model) == []


def test_non_finite_adapters_are_not_saved(tmp_path):
    from lorakit.errors import AdapterStateError

    model = _trained()
    with torch.no_grad():
        adapter_state_dict(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = (
            float("nan")
        )
    with pytest.raises(AdapterStateError, match="q_proj.lora_A.weight holds NaN or Inf"):
        lorakit.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a.b", "", "keys", 3])
def test_unusable_adapter_names_are_refused_before_anything_changes(tmp_path, name):
    from lorakit.errors import ConfigError

    lorakit.save_adapter(_trained(), tmp_path)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="adapter name"):
        lorakit.load_adapter(model, tmp_path, name)
    assert lorakit.list_adapters(model) == [] and not hasattr(model, "_lorakit_configs")


def test_saving_onto_a_file_is_a_storage_error_and_keeps_the_file(tmp_path):
    from lorakit.errors import StorageError

    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write .*out: the write failed .*is a file"):
        lorakit.save_adapter(_trained(), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_saving_one_adapter_over_the_old_nested_layout_leaves_no_stale_copy(tmp_path, ids):
    """out/alpha/alpha/ from the old layout must not shadow the adapter now saved in out/alpha."""
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    old = lorakit.inject(tiny_llama(), config, "alpha")
    lorakit.save_adapter(old, tmp_path / "alpha" / "alpha", "alpha")  # where the old layout put it
    base = tiny_llama()
    torch.manual_seed(5)  # another adapter on the same base
    new = lorakit.inject(base, config, "alpha")
    lorakit.save_adapter(new, tmp_path / "alpha", "alpha")
    assert not (tmp_path / "alpha" / "alpha").exists()
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "alpha", "alpha")
    assert torch.equal(_logits(loaded, ids), _logits(new, ids))
