"""Property-based fuzzing of the files lorakit reads: adapter configs (JSON objects with random keys,
values and types) and safetensors files (random and garbled headers, lengths, dtypes, shapes and
offsets). Whatever the bytes, the outcome is a success or a `LorakitError` with a message, never
another exception."""

import json
import struct
from pathlib import Path

import pytest
import torch
from fixtures import tiny_llama
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.io import read_adapter_tensors
from lorakit.quant.safetensors_io import SafetensorsReader

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

FIELDS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_dora", "task_type", "base_model_name_or_path",
    "inference_mode", "peft_type", "lorakit_fingerprint", "extra",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["q_proj", "all-linear", "none", "all", "gaussian", "LORA", "(", ".*", "layers", ""])
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# A valid config, then up to three keys changed: one field at a time reaches its own check, and
# plausible values reach inject and the load.
PLAUSIBLE = {
    "r": st.integers(-2, 70_000),
    "lora_alpha": st.floats(-4, 64) | st.integers(-4, 64),
    "lora_dropout": st.floats(-1, 2),
    "target_modules": st.sampled_from(
        ["all-linear", ["q_proj"], ["q_proj", "v_proj"], ".*proj", "nothing", []]
    ),
    "exclude_modules": st.sampled_from([None, ["v_proj"], ".*layers.0.*", "(", ["q_proj"]]),
    "layers_to_transform": st.integers(-1, 4) | st.lists(st.integers(-1, 4), max_size=3),
    "layers_pattern": st.sampled_from(["layers", ["layers"], "h", None, ["layers", "h"]]),
    "rank_pattern": st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", "(", "layers.1.q_proj"]), JSON, max_size=2
    ),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", "["]), JSON, max_size=2),
    "bias": st.sampled_from(["none", "all", "lora_only", "x"]),
    "modules_to_save": st.sampled_from([None, ["lm_head"], ["model.norm"], ["nothing"], ["embed_tokens"]]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", 1]),
    "use_rslora": st.booleans(),
    "lorakit_fingerprint": JSON | st.just({"modules": {"model.layers.0.self_attn.q_proj": [64, 64]}}),
}
VALID = st.fixed_dictionaries(
    {
        "r": st.integers(1, 8),
        "lora_alpha": st.integers(1, 16),
        "target_modules": st.sampled_from([["q_proj"], ["q_proj", "v_proj"], "all-linear", ".*\\.q_proj"]),
        "peft_type": st.just("LORA"),
    }
)
CHANGE = st.sampled_from(FIELDS).flatmap(
    lambda k: st.tuples(st.just(k), PLAUSIBLE.get(k, JSON) | JSON)
) | st.tuples(st.text(max_size=10), JSON)
CONFIGS = st.builds(
    lambda base, changes: {**base, **dict(changes)}, VALID, st.lists(CHANGE, max_size=3)
) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON, max_size=6)


def _clean(call, what: str = ""):
    """Run `call`; the outcome must be a success or a LorakitError with a message."""
    try:
        out = call()
    except LorakitError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        event(f"{what}: {type(e).__name__}")
        return None
    event(f"{what}: ok")
    return out


_BASE = []


def _model():
    """A fresh tiny model (a copy of one built once: building is most of an example's time)."""
    import copy

    if not _BASE:
        _BASE.append(tiny_llama(num_hidden_layers=2))
    return copy.deepcopy(_BASE[0])


@FUZZ
@given(data=CONFIGS)
def test_any_config_object_is_accepted_or_refused_with_a_lorakit_error(data):
    config = _clean(lambda: LoraConfig.from_dict(data, source="fuzz"), "config")
    if config is not None:  # a valid config round-trips, and injects or says why not
        # compared as JSON text: an unknown key's NaN round-trips but is never == itself
        assert LoraConfig.from_dict(json.loads(config.to_json())).to_json() == config.to_json()
        _clean(lambda: lorakit.inject(_model(), config), "inject")


@settings(FUZZ, max_examples=80)
@given(data=CONFIGS, raw=st.none() | st.none() | st.none() | st.binary(max_size=64))
def test_any_adapter_config_file_loads_or_is_refused_with_a_lorakit_error(tmp_path_factory, data, raw):
    """The whole load path (config, tensors, fingerprint, inject, copy) on a random config."""
    folder = tmp_path_factory.mktemp("a")
    text = json.dumps(data).encode() if raw is None else raw
    (folder / "adapter_config.json").write_bytes(text)
    from safetensors.torch import save_file

    try:  # the tensors the config describes when it is usable, so some loads succeed
        good = lorakit.inject(_model(), LoraConfig.from_dict(data))
    except LorakitError:
        good = lorakit.inject(_model(), LoraConfig(r=2, target_modules=["q_proj"]))

    tensors = {k: v.detach().clone() for k, v in lorakit.io.adapter_state_dict(good).items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    model = _model()
    if _clean(lambda: lorakit.load_adapter(model, folder), "load") is None:
        assert lorakit.list_adapters(model) == []  # a refused load leaves the model as it was


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}
DTYPES = [*SIZES, "F8_E4M3", "Q4", "", "f32"]


@st.composite
def safetensors_bytes(draw):
    """A well-formed safetensors file, then (usually) one thing broken: an entry's dtype, shape or
    offsets, garbled header bytes, a wrong header length, or a truncated file."""
    header, data = {}, b""
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(list(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = SIZES[dtype] * int(torch.tensor(shape).prod().item() if shape else 1)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += draw(st.binary(min_size=size, max_size=size))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | JSON
        )
    fault = draw(st.sampled_from(["none", "entry", "entry", "garble", "length", "truncate", "random"]))
    tensors = sorted(k for k in header if k != "__metadata__")
    if fault == "entry" and tensors:
        entry = header[draw(st.sampled_from(tensors))]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        choices = {"dtype": st.sampled_from(DTYPES), "shape": st.lists(st.integers(-2, 6), max_size=3),
                   "data_offsets": st.lists(st.integers(-4, 300), max_size=3)}  # fmt: skip
        entry[key] = draw(choices.get(key, JSON) | JSON)
    if fault == "random":
        header = draw(JSON)
    raw = json.dumps(header).encode()
    if fault == "garble" and raw:
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        raw = bytes(raw)
    length = len(raw)
    if fault == "length":
        length = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, len(raw) - 8), len(raw) + 8))
    content = struct.pack("<Q", length) + raw + data
    if fault == "truncate":
        content = content[: draw(st.integers(0, len(content)))]
    return content


@FUZZ
@given(content=safetensors_bytes())
def test_any_safetensors_bytes_read_or_are_refused_with_a_lorakit_error(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("s")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(content)
    _clean(lambda: read_adapter_tensors(folder), "safetensors")

    def stream():
        reader = SafetensorsReader(path)
        return [reader.get(k) for k in reader.keys()]

    tensors = _clean(stream, "stream")
    if tensors is not None:  # what the streaming reader accepts, safetensors reads the same
        from safetensors.torch import load_file

        try:
            reference = load_file(path)
        except Exception:  # safetensors may be stricter (e.g. about overlapping data): fine
            return
        reader = SafetensorsReader(path)
        for key, t in zip(reader.keys(), tensors):
            assert t.dtype == reference[key].dtype and t.shape == reference[key].shape
            assert torch.equal(_bytes(t), _bytes(reference[key]))  # bitwise: NaN payloads too


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_the_fuzzers_reach_the_deep_checks(tmp_path):
    """Sanity: a well-formed file passes both readers, so the properties above are not vacuous."""
    from safetensors.torch import save_file

    save_file({"a": torch.arange(6.0).reshape(2, 3)}, tmp_path / "adapter_model.safetensors")
    assert torch.equal(read_adapter_tensors(tmp_path)["a"], SafetensorsReader(Path(tmp_path)).get("a"))
    with pytest.raises(LorakitError, match="header length"):
        (tmp_path / "adapter_model.safetensors").write_bytes(b"\x01")
        SafetensorsReader(tmp_path / "adapter_model.safetensors")
