"""The one error type of the data pipeline, kept in its own module so every part can raise it."""


class DataError(ValueError):
    """A data setting, file or dataset is unusable; the message names it, the bad value and the fix."""
