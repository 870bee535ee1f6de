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

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.hf import load_model, load_tokenizer, resolve


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


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hub_id_loads_the_cached_snapshot_like_the_local_folder(offline, ids):
    assert resolve("org/tiny") == offline["home"] / "hub" / "models--org--tiny" / "snapshots" / COMMIT_A
    model, tok = load_model("org/tiny")
    local, local_tok = load_model(offline["first"])
    assert torch.equal(_logits(model, ids), _logits(local, ids))
    assert tok("hello")["input_ids"] == local_tok("hello")["input_ids"]
    assert model.config._name_or_path == "org/tiny"


def test_revision_picks_a_tag_or_a_commit(offline, ids):
    main_logits = _logits(load_model("org/tiny")[0], ids)
    expected = _logits(load_model(offline["second"])[0], ids)
    for rev in ("v2", COMMIT_B):
        got = _logits(load_model("org/tiny", revision=rev)[0], ids)
        assert torch.equal(got, expected) and not torch.equal(got, main_logits)
    assert load_tokenizer("org/tiny", revision="v2") is not None


def test_saved_adapter_names_the_hub_id_as_its_base(offline, tmp_path):
    model, _ = load_model("org/tiny")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS))
    (folder,) = lorakit.save_adapter(model, tmp_path / "a")
    config = lorakit.LoraConfig.from_json_file(folder)
    assert config.base_model_name_or_path == "org/tiny"
    assert config.extra["lorakit_fingerprint"]["base_model_name_or_path"] == "org/tiny"


def test_adapter_by_hub_id_equals_the_local_folder(offline, ids):
    by_id = lorakit.load_adapter(load_model("org/tiny")[0], "org/tiny-lora")
    by_folder = lorakit.load_adapter(load_model(offline["first"])[0], offline["adapter"])
    assert torch.equal(_logits(by_id, ids), _logits(by_folder, ids))
    assert not torch.equal(_logits(by_id, ids), _logits(load_model(offline["first"])[0], ids))


def test_not_cached_offline_says_what_was_tried(offline):
    with pytest.raises(ConfigError) as e:
        load_model("org/absent")
    message = str(e.value)
    assert "org/absent@main" in message and str(offline["home"] / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message and "no local folder" in message
    with pytest.raises(ConfigError, match="org/tiny@v9"):
        load_model("org/tiny", revision="v9")
    with pytest.raises(AdapterFileError, match="adapter 'org/absent-lora' not found"):
        lorakit.load_adapter(load_model("org/tiny")[0], "org/absent-lora")


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
