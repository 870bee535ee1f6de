"""The one exception hierarchy of lorakit.

Every error lorakit raises on purpose is a :class:`LorakitError`, so callers can catch one
type. Messages name the file, key or module at fault and say what to do about it.
"""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A LoRA or training configuration is invalid (bad value, unknown target, wrong type)."""


class TargetNotFoundError(ConfigError):
    """A configuration's target modules match nothing in the model."""


class AdapterFileError(LorakitError):
    """An adapter or checkpoint file is missing, malformed, corrupt or unsafe to read."""


class ShapeMismatchError(LorakitError):
    """An adapter or checkpoint does not fit the model it is loaded onto."""


class AdapterStateError(LorakitError, KeyError):
    """An adapter name is unknown, duplicated, or used in a state that forbids the call."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QuantizationError(LorakitError, ValueError):
    """A quantization input or state is invalid (shape, dtype, block size, corrupt state)."""


class DataError(LorakitError, ValueError):
    """A dataset file or record is malformed, empty, or missing a needed column."""


class TrainingError(LorakitError):
    """Training cannot go on (a non-finite loss, for example); the last good checkpoint is kept."""


# The one table from error class to HTTP status (the server's answer to a request that raised it).
HTTP_STATUS: dict[type[LorakitError], int] = {
    AdapterStateError: 404,  # an unknown adapter name
    AdapterFileError: 422,  # the adapter exists but its files are broken or unsafe
    ShapeMismatchError: 422,  # the adapter does not fit the model
    TargetNotFoundError: 422,
    ConfigError: 400,
    DataError: 400,
    QuantizationError: 400,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status for `exc`: that of its nearest class in `HTTP_STATUS`, else 500."""
    return next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 500)
