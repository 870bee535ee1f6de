"""lorakit.commands.serve: flags and `--adapter NAME=DIR` specs, checked before the model loads."""

import shutil
from pathlib import Path

import pytest
from fixtures import make_adapter, tiny_chat_model

from lorakit.cli import main
from lorakit.commands.serve import parse_adapters
from lorakit.errors import ConfigError
from lorakit.serve import Engine


def test_cli_arguments():
    assert parse_adapters(["x=/a", "y=/b=c"]) == {"x": Path("/a"), "y": Path("/b=c")}
    for bad in (["/just/a/path"], ["x=/a", "x=/b"], ["=/a"]):
        with pytest.raises(ConfigError):
            parse_adapters(bad)


@pytest.mark.parametrize(
    "flags, word",
    [
        (["--max-queue", "0"], "--max-queue"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--max-batch", "0"], "--max-batch"),
        (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-prompt-tokens", "-5"], "--max-prompt-tokens"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--body-timeout", "inf"], "--body-timeout"),
        (["--max-loaded", "0"], "--max-loaded"),
        (["--port", "70000"], "--port"),
        (["--adapter", "a/b=/x"], "invalid adapter name"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--prefill-chunk", "0"], "--prefill-chunk"),
        (["--max-queue-per-adapter", "0"], "--max-queue-per-adapter"),
        (["--max-loaded-bytes", "0"], "--max-loaded-bytes"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    ],
)
def test_bad_flags_are_refused_before_the_model_loads(flags, word, tmp_path, capsys):
    # the model does not exist: a flag error proves the check came first
    assert main(["serve", "--model", str(tmp_path / "missing"), *flags]) == 1
    err = capsys.readouterr().err
    assert word in err and "not found" not in err, err


def test_engine_refuses_a_queue_of_zero():
    for bad in ((8, 10.0, 0), (0, 10.0, 8), (8, float("inf"), 8), (True, 10.0, 8)):
        with pytest.raises(ConfigError):
            Engine.check_settings(*bad)
    Engine.check_settings(1, 0.0, 1)


def test_adapter_named_like_the_base_is_refused(tmp_path, capsys):
    folder = tiny_chat_model(tmp_path / "base")
    shutil.copytree(make_adapter(folder, tmp_path / "a", 1), tmp_path / "dir" / "base")
    assert main(["serve", "--model", str(folder), "--adapter-dir", str(tmp_path / "dir")]) == 1
    assert "the base model's id" in capsys.readouterr().err


def test_a_seq2seq_model_is_refused_at_startup_with_what_to_use(tmp_path, capsys):
    from fixtures import tiny_seq2seq_model

    folder = tiny_seq2seq_model(tmp_path / "t5", "t5")
    assert main(["serve", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "encoder-decoder (seq2seq) model" in err and "lorakit generate" in err
