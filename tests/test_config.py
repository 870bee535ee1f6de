import json
import logging
import re

import pytest

from lorakit import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError


def test_json_round_trip_keeps_every_field_and_unknown_keys(tmp_path, caplog):
    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"v_proj": 2}, use_rslora=True
    )
    data = cfg.to_dict()
    assert data["peft_type"] == "LORA" and data["r"] == 4
    data["some_future_peft_option"] = {"x": 1}
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        back = LoraConfig.from_json_file(path)
    assert "some_future_peft_option" in caplog.text
    assert back.to_dict() == data
    assert back.rank_pattern == {"v_proj": 2}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(r=0), "r must be a positive"),
        (dict(r=-3), "r must be a positive"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(bias="some"), "bias"),
        (dict(init_lora_weights="eva"), "init_lora_weights"),
        (dict(target_modules=[]), "empty list"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
    ],
)
def test_invalid_values_are_clear_errors(kwargs, word):
    kwargs = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ConfigError, match=word):
        LoraConfig(**kwargs)


def test_missing_targets_explains_the_choices():
    with pytest.raises(ConfigError, match="all-linear"):
        LoraConfig()


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json.*not valid JSON"):
        LoraConfig.from_json_file(tmp_path)


def test_bad_value_in_file_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 0, "target_modules": ["q"]}))
    with pytest.raises(ConfigError, match="adapter_config.json.*r must be"):
        LoraConfig.from_json_file(tmp_path)


def test_other_peft_types_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q"]}))
    with pytest.raises(ConfigError, match="IA3"):
        LoraConfig.from_json_file(tmp_path)


def test_patterns_and_scaling_follow_peft_rules():
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj"],
        rank_pattern={"layers.1.q_proj": 2},
        alpha_pattern={"q_proj": 4},
    )
    assert cfg.rank_for("model.layers.1.q_proj") == 2
    assert cfg.rank_for("model.layers.11.q_proj") == 8  # "layers.1." must not match layer 11
    assert cfg.scaling_for("model.layers.1.q_proj") == 4 / 2
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q"]).scaling_for("q") == 8 / 4


# every wrong type or range is a ConfigError naming the key, in Python and in adapter_config.json

WRONG = [
    ("lora_dropout", "x", "a number in"),
    ("lora_dropout", True, "a number in"),
    ("lora_dropout", -0.1, "a number in"),
    ("rank_pattern", ["q_proj", 2], "a {regex: rank} object"),
    ("rank_pattern", {"q": "2"}, "positive integer"),
    ("rank_pattern", {"q(": 2}, "an invalid regex"),
    ("alpha_pattern", {"q": -1}, "positive finite number"),
    ("target_modules", 5, "a list of module names"),
    ("target_modules", ["q_proj", 3], "a list of module names"),
    ("target_modules", "q_proj(", "an invalid regex"),
    ("exclude_modules", "[", "an invalid regex"),
    ("exclude_modules", {"a": 1}, "None, a list of module names"),
    ("r", 4.0, "positive integer"),
    ("r", True, "positive integer"),
    ("r", "8", "positive integer"),
    ("lora_alpha", -8, "positive finite number"),
    ("lora_alpha", "16", "positive finite number"),
    ("lora_alpha", float("nan"), "positive finite number"),
    ("bias", "some", "one of"),
    ("bias", ["none"], "one of"),
    ("layers_to_transform", ["0", "1"], "layer indices"),
    ("layers_to_transform", -1, "layer indices"),
    ("layers_to_transform", 1.5, "layer indices"),
    ("layers_pattern", 3, "None, a name or a list of names"),
    ("modules_to_save", "score", "None or a list of module names"),
    ("init_lora_weights", 1, "True, False, 'gaussian', 'pissa', 'pissa_niter_N', 'olora' or 'loftq'"),
    ("use_rslora", "yes", "true or false"),
    ("fan_in_fan_out", 0, "true or false"),
    ("inference_mode", None, "true or false"),
    ("task_type", 3, "None or a string"),
    ("base_model_name_or_path", ["x"], "None or a string"),
    ("extra", [1], "a {key: value} object"),
]


@pytest.mark.parametrize("key, value, expected", WRONG)
def test_wrong_types_and_ranges_name_the_key_and_what_it_must_be(key, value, expected):
    kwargs = {"target_modules": ["q_proj"], key: value}
    with pytest.raises(ConfigError, match=f"LoraConfig.{key}.*{re.escape(expected)}"):
        LoraConfig(**kwargs)


# in a file "extra" is just an unknown key, kept as it is
@pytest.mark.parametrize("key, value, expected", [w for w in WRONG if w[0] != "extra"])
def test_wrong_types_in_a_file_name_the_file_and_the_key(tmp_path, key, value, expected):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj"], key: value}))
    with pytest.raises(ConfigError, match=f"adapter_config.json: LoraConfig.{key}.*{re.escape(expected)}"):
        LoraConfig.from_json_file(tmp_path)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"[1, 2]", "expected a JSON object"),
        (b'"r"', "expected a JSON object"),
        (b"8", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b'{"r": 8, "target_modules": ["q"], "bias": "\xff\xfe"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_unreadable_config_files_are_adapter_file_errors(tmp_path, content, says):
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(AdapterFileError, match=f"adapter_config.json: {says}"):
        LoraConfig.from_json_file(tmp_path)


def test_sets_and_tuples_become_lists():
    cfg = LoraConfig(
        target_modules={"v_proj", "q_proj"}, layers_to_transform=(0, 2), modules_to_save=("score",)
    )
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.layers_to_transform == [0, 2] and cfg.modules_to_save == ["score"]
    with pytest.raises(ConfigError, match="target_modules"):
        LoraConfig(target_modules={"q_proj", 1})  # mixed types: a clear error, not a sort TypeError
