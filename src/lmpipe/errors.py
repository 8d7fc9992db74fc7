"""User-facing errors.

Anything raised as an ``LmpipeError`` is a problem with the user's input (a config value, a
data record, a checkpoint) and is reported by the entrypoints as one line without a
traceback. Every other exception is a bug and keeps its traceback.
"""


class LmpipeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(LmpipeError):
    """A config value is missing, of the wrong type, or out of range."""


class DataError(LmpipeError):
    """A data source or record is unusable (message names the file and line)."""


class CheckpointError(LmpipeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""
