"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""


class FinetuneError(Exception):
    """Base class: the message says what went wrong and what to do next."""


class ConfigError(FinetuneError):
    """A config value is missing, has the wrong type, or names something that does not exist."""


class DataError(FinetuneError):
    """The data cannot be used as given (missing folder, no classes, empty split, unknown class)."""


class WeightsError(FinetuneError):
    """Pretrained weights could not be found, loaded, or verified."""


class NonFiniteLossError(FinetuneError):
    """The training loss became NaN or infinite: training cannot recover by itself."""


class OutOfMemoryError(FinetuneError):
    """A batch did not fit in GPU (or CPU) memory: the message names a batch size to try."""
