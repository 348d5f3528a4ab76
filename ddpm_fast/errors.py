"""Error types for the user's mistakes, which the command line reports in one line (exit 2); any other
exception is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input from the user: the base of every error the command line reports in one line."""


class BadValue(UserError, ValueError):
    """An argument, option or file holds a value we cannot use; the message names it."""


class BadType(UserError, TypeError):
    """An argument has a type we cannot use; the message names it."""


class Unavailable(UserError, RuntimeError):
    """An accelerator, library or file format the request needs is not available here; the message names it."""
