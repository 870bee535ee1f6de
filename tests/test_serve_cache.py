"""lorakit.serve.cache: which adapters exist (by name, confined to --adapter-dir, symlinks out
refused), which are loaded (LRU within the capacity), dotted names, all-or-nothing `add`."""

import os
import shutil

import pytest
from fixtures import make_adapter, tiny_chat_model

import lorakit
import lorakit.hf
from lorakit.errors import AdapterFileError, AdapterStateError, ConfigError, http_status
from lorakit.generate import Row, Sampling, eos_ids, generate_tokens, prompt_ids
from lorakit.layers import LoraLinear
from lorakit.serve import AdapterCache
from lorakit.serve.cache import AdapterLoadError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    folder = tiny_chat_model(d / "model")
    paths = {f"a{i}": make_adapter(folder, d / f"a{i}", i) for i in range(1, 4)}
    return d, folder, paths


def adapter_dir(d, paths, name: str):
    allowed = d / name
    allowed.mkdir()
    for n, p in paths.items():
        shutil.copytree(p, allowed / n)
    return allowed


def test_lru_keeps_at_most_capacity(setup):
    d, folder, paths = setup
    model, _ = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, paths, capacity=2)
    for names, loaded in (
        (["a1"], ["a1"]),
        (["a2"], ["a1", "a2"]),
        (["a1"], ["a2", "a1"]),
        (["a3"], ["a1", "a3"]),
    ):
        cache.ensure(names)
        assert cache.loaded_names() == loaded
        assert sorted(lorakit.list_adapters(model)) == sorted(cache.key(n) for n in loaded)
    with pytest.raises(AdapterStateError, match="holds 2"):
        cache.ensure(["a1", "a2", "a3"])
    with pytest.raises(ConfigError):
        AdapterCache(model, capacity=0)


def test_symlinks_out_of_the_adapter_dir_are_refused(setup, tmp_path):
    d, folder, paths = setup
    allowed = adapter_dir(tmp_path, {"a1": paths["a1"]}, "allowed")
    outside = tmp_path / "outside"
    shutil.copytree(paths["a2"], outside)
    os.symlink(outside, allowed / "link")  # the folder is a link out
    (allowed / "half").mkdir()  # a real folder whose weights are a link out
    shutil.copy(paths["a2"] / "adapter_config.json", allowed / "half")
    os.symlink(outside / "adapter_model.safetensors", allowed / "half" / "adapter_model.safetensors")
    os.symlink(allowed / "a1", allowed / "alias")  # a link that stays inside is fine
    model, _ = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, adapter_dir=allowed)
    assert cache.names() == ["a1", "alias"]
    for name in ("link", "half"):
        with pytest.raises(AdapterStateError, match="outside the adapter folder") as e:
            cache.add(name)
        assert http_status(e.value) == 404 and name not in cache
    cache.add("alias")
    # a folder that turns into a link out after it was found is refused when it is loaded
    shutil.rmtree(allowed / "a1")
    os.symlink(outside, allowed / "a1")
    cache.unload("alias")
    with pytest.raises(AdapterStateError, match="outside"):
        cache.ensure(["alias"])


def test_dotted_names_load_under_safe_keys(setup, tmp_path):
    d, folder, paths = setup
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copytree(paths["a1"], allowed / "llama-3.1.math")
    model, tok = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, {"v1.2": paths["a2"]}, adapter_dir=allowed)
    cache.ensure(["llama-3.1.math", "v1.2"])
    keys = [cache.key("llama-3.1.math"), cache.key("v1.2")]
    assert keys == ["llama_3_1_math", "v1_2"] and sorted(lorakit.list_adapters(model)) == sorted(keys)
    ref, _ = lorakit.hf.load_model(folder)
    lorakit.load_adapter(ref, paths["a1"], "a1")
    ids = prompt_ids(tok, "Hi")
    got = list(generate_tokens(model, [Row(ids, keys[0], Sampling(5))], eos_ids(model, tok)))
    assert got == list(generate_tokens(ref, [Row(ids, "a1", Sampling(5))], eos_ids(ref, tok)))


def test_add_is_all_or_nothing_and_load_errors(setup, tmp_path):
    d, folder, paths = setup
    allowed = adapter_dir(tmp_path, {"a1": paths["a1"]}, "allowed")
    (allowed / "broken").mkdir()
    shutil.copy(paths["a1"] / "adapter_config.json", allowed / "broken")
    (allowed / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    model, _ = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, adapter_dir=allowed)
    with pytest.raises(AdapterFileError) as e:
        cache.remove("broken")
        cache.add("broken")
    assert "broken" not in cache and http_status(e.value) == 422  # the admin asked for a broken one
    cache = AdapterCache(model, adapter_dir=allowed)
    with pytest.raises(AdapterLoadError, match="could not be loaded") as e:
        cache.ensure(["broken"])  # a request for it: the server's fault
    assert http_status(e.value) == 500 and lorakit.list_adapters(model) == []
    with pytest.raises(AdapterStateError, match="no adapter named") as e:
        cache.add("missing")
    assert http_status(e.value) == 404
    with pytest.raises(ConfigError, match="invalid adapter name"):
        cache.add("../a1")
    with pytest.raises(ConfigError, match="without --adapter-dir"):
        AdapterCache(model).add("a1")


def test_nested_layout_is_found(setup, tmp_path):
    """`save_adapter(model, "out/x", adapter="x")` used to write out/x/x/: both layouts load."""
    d, folder, paths = setup
    shutil.copytree(paths["a1"], tmp_path / "given" / "alpha")
    shutil.copytree(paths["a2"], tmp_path / "allowed" / "beta" / "beta")
    model, _ = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, {"alpha": tmp_path / "given"}, adapter_dir=tmp_path / "allowed")
    assert cache.names() == ["alpha", "beta"]
    cache.ensure(["alpha", "beta"])
    assert sorted(lorakit.list_adapters(model)) == ["alpha", "beta"]
    for sub in ("p", "q"):
        shutil.copytree(paths["a1"], tmp_path / "two" / sub)
    with pytest.raises(AdapterFileError, match="has no adapter_config.json"):
        AdapterCache(model, {"x": tmp_path / "two"})  # two nested adapters: ambiguous


def test_byte_limit_pinned_adapters_and_deferred_unload(setup):
    from lorakit.serve.cache import NoRoom

    d, folder, paths = setup
    model, _ = lorakit.hf.load_model(folder)
    probe = AdapterCache(model, paths)
    probe.ensure(["a1"])
    size = probe.loaded_bytes()  # its parameters and the layers' stacks of them (zero slot + a1)
    params = sum(p.nbytes for p in lorakit.io.adapter_state_dict(model, probe.key("a1")).values())
    assert size == params + sum(m.stack_nbytes() for m in model.modules() if isinstance(m, LoraLinear))
    assert size > 2 * params
    probe.ensure(["a1", "a2"])
    two = probe.loaded_bytes()
    probe.unload("a1"), probe.unload("a2")
    cache = AdapterCache(model, paths, capacity=8, max_bytes=two + (two - size) // 2)  # room for two
    k1, _ = cache.load("a1"), cache.load("a2")
    k3 = cache.load("a3", pinned={k1})  # a1 is in use: a2 (the other one) goes
    assert cache.loaded_names() == ["a1", "a3"] and cache.loaded_bytes() <= cache.max_bytes
    with pytest.raises(NoRoom):
        cache.load("a2", pinned={k1, k3})
    cache.remove("a1", pinned={k1})  # forgotten at once, on the model until its rows are done
    assert "a1" not in cache and k1 in lorakit.list_adapters(model)
    cache.drain({k1})
    assert k1 in lorakit.list_adapters(model)
    cache.drain(set())
    assert k1 not in lorakit.list_adapters(model) and not cache.draining
    tiny = AdapterCache(lorakit.hf.load_model(folder)[0], paths, max_bytes=size - 1)
    with pytest.raises(AdapterStateError, match="more than --max-loaded-bytes"):
        tiny.load("a1")
    assert tiny.loaded_names() == []


def test_stacks_are_built_when_the_adapters_change(setup):
    """Loading, removing and draining rebuild the layers' inference stacks at once, so the next
    mixed-adapter batch finds them current and builds nothing."""
    d, folder, paths = setup
    model, tok = lorakit.hf.load_model(folder)
    cache = AdapterCache(model, paths, capacity=3)
    keys = [cache.load(n) for n in ("a1", "a2", "a3")]
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]

    def stacked_names():
        assert all(m._stacks is not None for m in layers)
        return {tuple(n for n, _, _ in m._stacks[0]) for m in layers}

    assert stacked_names() == {tuple(keys)}
    built = [m._stacks for m in layers]
    rows = [Row(prompt_ids(tok, "hi", True), k, Sampling(max_tokens=2)) for k in keys]
    list(generate_tokens(model, rows, eos_ids(model, tok), tok.pad_token_id))
    assert all(m._stacks is b for m, b in zip(layers, built))  # used as built, not rebuilt
    cache.remove("a3")
    assert stacked_names() == {tuple(keys[:2])}
    cache.remove("a2", pinned={keys[1]})  # in use: stays on the model until drained
    assert stacked_names() == {tuple(keys[:2])}
    cache.drain(set())
    assert stacked_names() == {(keys[0],)}
