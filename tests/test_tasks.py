"""lorakit.tasks: the shared vocabulary (task names, ignore label, target-modules rule)."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.tasks import IGNORE_INDEX, TASKS, check_task, parse_target_modules


def test_ignore_index_is_pytorchs_cross_entropy_default():
    import inspect

    import torch.nn.functional as F

    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX


def test_check_task_names_the_choices():
    assert [check_task(t) for t in TASKS] == list(TASKS)
    with pytest.raises(ConfigError, match="task must be one of"):
        check_task("regression")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all-linear", "all-linear"),
        (" q_proj, v_proj ", ["q_proj", "v_proj"]),
        ("q_proj v_proj", ["q_proj", "v_proj"]),
        (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    ],
)
def test_parse_target_modules(text, expected):
    assert parse_target_modules(text) == expected


def test_empty_target_modules_is_refused():
    with pytest.raises(ConfigError, match="target_modules is empty"):
        parse_target_modules(" , ")
