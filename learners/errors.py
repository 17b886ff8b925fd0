"""User errors: bad flags, paths, data, checkpoints. Shown as one line; a traceback only with --debug."""


class UserError(Exception):
    """Something the user can fix; the message names what, the value and what was expected."""
