"""User errors: bad flags, paths, data, checkpoints. Shown as one line; a traceback only with --debug."""

from tfquant.errors import TfquantError



class UserError(TfquantError):
    """Something the user can fix; the message names what, the value and what was expected."""
