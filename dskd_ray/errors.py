"""The few exception types the library raises; the CLI turns each into one line on stderr."""


class DSKDError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class DataError(DSKDError):
    """A data folder is missing, empty or not laid out as expected."""


class WeightsError(DSKDError):
    """Teacher weights are missing, unreadable or do not fit the backbone."""


class CheckpointError(DSKDError):
    """A checkpoint is missing, corrupt or from an incompatible version."""


class ConfigError(DSKDError):
    """An option has a value the library does not support."""


class StorageError(DSKDError):
    """Object storage or a file system could not be reached, or refused a request."""


class ScoreError(DSKDError):
    """The model gave a score that is not a finite number: its weights are broken."""
