"""lorakit.commands.serve: flags and `--adapter NAME=DIR` specs, checked before the model loads."""

from pathlib import Path

import pytest

from lorakit.commands.serve import parse_adapters
from lorakit.errors import ConfigError


def test_cli_arguments():
    assert parse_adapters(["x=/a", "y=/b=c"]) == {"x": Path("/a"), "y": Path("/b=c")}
    for bad in (["/just/a/path"], ["x=/a", "x=/b"], ["=/a"]):
        with pytest.raises(ConfigError):
            parse_adapters(bad)
