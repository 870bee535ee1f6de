"""lorakit.train.config: defaults, YAML then flags, validation of every setting."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.train import resolve_config
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
