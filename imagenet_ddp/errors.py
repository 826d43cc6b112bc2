"""Errors a user can act on: the CLIs print them as one line and exit with status 2."""


class UserError(Exception):
    """Bad input or arguments: message names the problem; no traceback is shown."""
