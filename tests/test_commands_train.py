"""lorakit.commands.train: flags generated from TrainConfig, errors without a traceback."""

from __future__ import annotations

import pytest

from lorakit.train import TrainConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_help_documents_every_setting(capsys):
    from lorakit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--config" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: cannot read it"),
        (["--task", "regression"], "task must be one of"),
        (["--batch-size", "6", "--grad-accum", "4"], "multiple of grad_accum"),
    ],
)
def test_cli_reports_bad_settings_without_a_traceback(capsys, tmp_path, argv, message):
    from lorakit.cli import main

    assert main(["train", "--output", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error:") and message in err
    assert not (tmp_path / "out").exists()
