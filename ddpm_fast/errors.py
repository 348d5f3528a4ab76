"""Error types the command line reports in one line (exit 2) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user that is neither a ValueError nor a TypeError (e.g. conflicting options)."""


class Unavailable(RuntimeError):
    """An accelerator, library or file format the request needs is not available here; the message names it."""
