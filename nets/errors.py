"""User-facing errors raised by the nets package."""

from tfquant.errors import TfquantError



class DataError(TfquantError, ValueError):
    """A data set on disk is missing, unreadable or malformed; the message is one line naming the path.

    Attributes:
      path: the file or directory at fault (None when a caller did not give it).
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path

    @classmethod
    def for_path(cls, path):
        """A one-argument factory (message -> DataError carrying path), the error_cls tfquant.files expects."""
        return lambda message: cls(message, path=path)
