"""lorakit.train.config: defaults, YAML then flags, validation of every setting."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, resolve_config
from lorakit.train.config import load_yaml

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- config


def test_yaml_values_then_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nmax-steps: 7\nr: 4\ndata: d.jsonl\n")
    cfg = resolve_config(load_yaml(path), {"r": 8})
    assert (cfg.lr, cfg.max_steps, cfg.r, cfg.data) == (1e-3, 7, 8, "d.jsonl")
    assert resolve_config({}, {"data": "x"}).max_steps is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1\n", "not valid YAML"),
        ("learning_rate: 1\n", "unknown setting 'learning_rate'"),
        ("lr: fast\n", "lr must be a number"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"task": "regression"}, "task must be one of"),
        ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
        ({"layers": "1-x"}, "layers must look like"),
        ({"quantize": "int3"}, "quantize must be one of"),
    ],
)
def test_bad_settings_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({}, flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"lr": float("nan")}, r"lr \(--lr\) must be a finite number > 0, got nan"),
        ({"lr": 0.0}, r"lr \(--lr\) must be a finite number > 0"),
        ({"epochs": float("inf")}, r"epochs \(--epochs\) must be a finite number > 0, got inf"),
        ({"weight_decay": -1.0}, r"weight_decay \(--weight-decay\) must be a finite number >= 0"),
        ({"max_length": 1}, r"max_length \(--max-length\) must be a finite number >= 2"),
        ({"max_minutes": -1.0}, r"max_minutes \(--max-minutes\) must be a finite number > 0"),
        ({"max_eval": -1}, r"max_eval \(--max-eval\) must be a finite number >= 0"),
        ({"max_grad_norm": float("nan")}, r"max_grad_norm \(--max-grad-norm\) must be a finite number >= 0"),
        ({"batch_size": 0}, r"batch_size \(--batch-size\) must be a finite number >= 1"),
        ({"batch_size": -4}, r"batch_size \(--batch-size\) must be a finite number >= 1"),
        ({"eval_batch_size": 0}, r"eval_batch_size \(--eval-batch-size\) must be"),
        ({"lora_dropout": 1.0}, r"lora_dropout \(--lora-dropout\) must be a finite number >= 0 and < 1"),
        ({"lora_alpha": float("-inf")}, r"lora_alpha \(--lora-alpha\) must be a finite number > 0"),
        ({"seed": -1}, r"seed \(--seed\) must be a finite number >= 0 and <= 4294967295"),
        ({"seed": 2**40}, r"seed \(--seed\) must be"),
        ({"threads": 0}, r"threads \(--threads\) must be"),
        ({"keep_checkpoints": 0}, r"keep_checkpoints \(--keep-checkpoints\) must be"),
        ({"max_steps": 5, "warmup_steps": 20}, r"warmup_steps \(20\) must be <= max_steps \(5\)"),
        ({"r": 4.5}, r"r \(--lora-rank\) must be an integer, got 4.5"),
        ({"pack": "no"}, r"pack \(--pack\) must be true or false, got 'no'"),
        ({"lr": True}, r"lr \(--lr\) must be a number, got True"),
        ({"target_modules": " , "}, "target_modules is empty"),
        ({"model": " "}, r"model \(--model\) is empty"),
        ({"pack": True, "task": "classification"}, "classification examples cannot be packed"),
    ],
)
def test_nonsense_numbers_and_types_name_the_flag_and_the_valid_range(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({}, {"data": "d.jsonl", **flags})
    if "warmup_steps" not in flags:  # the Python API validates the same way
        with pytest.raises(ConfigError, match=message):
            TrainConfig(data="d.jsonl", **flags).validate()


def test_default_warmup_is_cut_to_a_short_run_not_refused():
    assert resolve_config({}, {"data": "d", "max_steps": 4}).warmup_steps == 10


@pytest.mark.parametrize(
    "layers, message",
    [
        ("5-2", r"the range '5-2' is reversed; write 2-5"),
        ("a-b", "layers must look like"),
        ("-1", "layers must look like"),
        ("1,,2", "layers must look like"),
        ("1-", "layers must look like"),
    ],
)
def test_bad_layer_ranges_are_refused_at_parse(layers, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({}, {"layers": layers})


def test_layer_list_is_sorted_and_unique():
    assert TrainConfig(layers="4,0,2-3,2").layer_list() == [0, 2, 3, 4]


@pytest.mark.parametrize(
    "text, value",
    [("pack: 'no'\n", False), ('pack: "Yes"\n', True), ("pack: no\n", False), ("pack: true\n", True)],
)
def test_yaml_booleans_are_parsed_strictly(tmp_path, text, value):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert load_yaml(path) == {"pack": value}


def test_yaml_boolean_that_is_no_boolean_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pack: 'maybe'\n")
    with pytest.raises(ConfigError, match=r"pack must be true or false \(or yes/no\), got 'maybe'"):
        load_yaml(path)


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_yaml(path)


def test_saved_config_never_records_resume_or_overwrite(tmp_path):
    from lorakit.train.config import save_resolved

    save_resolved(TrainConfig(data="d", resume=True, overwrite=True), tmp_path)
    saved = load_yaml(tmp_path / "train_config.yaml")
    assert saved["resume"] is False and saved["overwrite"] is False and saved["data"] == "d"


def test_paths_are_accepted_where_path_strings_go(tmp_path):
    cfg = TrainConfig(data=tmp_path / "d.jsonl", output=tmp_path / "o").validate()
    assert (cfg.data, cfg.output) == (str(tmp_path / "d.jsonl"), str(tmp_path / "o"))
