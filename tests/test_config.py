import json
import logging

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
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
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
