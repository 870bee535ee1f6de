"""lorakit.hf: models (and adapters) by Hub ID through a Hugging Face cache built on disk.

No hub is reachable from the tests, so each test lays out the cache `huggingface_hub` reads
(`models--org--name/{blobs,snapshots/<commit>,refs/main}`, files as symlinks into blobs, as a real
download leaves them), points `HF_HOME` at it with `HF_HUB_OFFLINE=1`, and loads through the same
`snapshot_download` call an online run makes.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import TARGETS, make_adapter, tiny_chat_model
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.hf import load_model, load_tokenizer, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def put_in_cache(hf_home: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Lay out `folder`'s files as the snapshot `commit` of `repo_id` in the hub cache under `hf_home`."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An HF cache holding org/tiny (two commits: main and tag v2, different weights) and
    org/tiny-lora (an adapter for org/tiny, trained on nothing but random)."""
    root = tmp_path_factory.mktemp("hub")
    home = root / "hf"
    first = tiny_chat_model(root / "first")
    put_in_cache(home, "org/tiny", first, COMMIT_A)
    second = root / "second"
    shutil.copytree(first, second)
    model, _ = load_model(first)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(second)
    put_in_cache(home, "org/tiny", second, COMMIT_B, refs=("v2",))
    adapter = make_adapter(first, root / "lora", seed=3)
    put_in_cache(home, "org/tiny-lora", adapter, "c" * 40)
    return dict(home=home, first=first, second=second, adapter=adapter)


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub


def same_weights(model, folder: Path) -> bool:
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in saved.items())


def test_hub_id_loads_the_cached_snapshot_and_names_it_as_the_base(offline, tmp_path):
    assert resolve("org/tiny") == offline["home"] / "hub" / "models--org--tiny" / "snapshots" / COMMIT_A
    model, tok = load_model("org/tiny")
    assert same_weights(model, offline["first"]) and model.config._name_or_path == "org/tiny"
    assert tok("hello")["input_ids"] == load_tokenizer(offline["first"])("hello")["input_ids"]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS))
    (folder,) = lorakit.save_adapter(model, tmp_path / "a")
    config = lorakit.LoraConfig.from_json_file(folder)  # what PEFT, vLLM and llama.cpp read
    assert config.base_model_name_or_path == "org/tiny"
    assert config.extra["lorakit_fingerprint"]["base_model_name_or_path"] == "org/tiny"


def test_revision_picks_a_tag_or_a_commit(offline):
    snapshots = offline["home"] / "hub" / "models--org--tiny" / "snapshots"
    assert (
        resolve("org/tiny", revision="v2") == resolve("org/tiny", revision=COMMIT_B) == snapshots / COMMIT_B
    )
    model, _ = load_model("org/tiny", revision="v2")
    assert same_weights(model, offline["second"]) and not same_weights(model, offline["first"])


def test_adapter_by_hub_id_equals_the_local_folder(offline):
    model = lorakit.load_adapter(load_model("org/tiny")[0], "org/tiny-lora")
    local = lorakit.io.read_adapter_tensors(offline["adapter"])
    loaded = lorakit.io.adapter_state_dict(model)
    assert set(loaded) == set(local) and all(torch.equal(loaded[k], v) for k, v in local.items())


def test_not_cached_offline_says_what_was_tried(offline):
    with pytest.raises(ConfigError) as e:
        load_model("org/absent")
    message = str(e.value)
    assert "org/absent@main" in message and str(offline["home"] / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message and "no local folder" in message
    with pytest.raises(ConfigError, match="org/tiny@v9"):
        resolve("org/tiny", revision="v9")
    with pytest.raises(AdapterFileError, match="adapter 'org/absent-lora' not found"):
        lorakit.load_adapter(torch.nn.Linear(2, 2), "org/absent-lora")


def test_not_a_path_nor_a_hub_id(tmp_path):
    with pytest.raises(ConfigError, match="not a Hub ID"):
        resolve(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a model"):
        (tmp_path / "weights.bin").write_bytes(b"")
        resolve(tmp_path / "weights.bin")


def test_snapshot_without_safetensors_is_refused(offline, tmp_path):
    config_only = tmp_path / "c"
    config_only.mkdir()
    shutil.copy(offline["first"] / "config.json", config_only)
    put_in_cache(offline["home"], "org/config-only", config_only, "d" * 40)
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        resolve("org/config-only")


def test_commands_take_hub_ids(offline, capsys):
    assert (
        main(["generate", "--model", "org/tiny", "--adapter", "org/tiny-lora", "--max-tokens", "3", "Hi"])
        == 0
    )
    assert main(["plan", "--model", "org/tiny", "--target-modules", "q_proj"]) == 0
    assert "trainable" in capsys.readouterr().out


def test_train_by_hub_id_saves_an_adapter_naming_it(offline, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "fact {i} is {i * 7}"}}\n' for i in range(8)))
    argv = ["train", "--model", "org/tiny", "--data", str(data), "--output", str(tmp_path / "run")]
    assert (
        main([*argv, "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0", "--threads", "1"]) == 0
    )
    config = lorakit.LoraConfig.from_json_file(tmp_path / "run" / "adapter")
    assert config.base_model_name_or_path == "org/tiny"
