"""The one base of every error a user can cause and fix: a file, a setting, a checkpoint, a report, data.

The edges (run scripts, `python -m tfquant.export`, `python -m tfquant.report`) catch this one type and print
its message as one `error:` line; any other exception is a bug of ours and keeps its traceback.
"""


class TfquantError(Exception):
    """Something the user can fix; the message is one line naming what was wrong and what was expected."""
