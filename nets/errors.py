"""User-facing errors raised by the nets package."""


class DataError(ValueError):
    """A data set on disk is missing or malformed; the message is one line naming the path."""
