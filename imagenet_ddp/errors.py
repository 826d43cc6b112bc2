"""Errors a user can act on: the CLIs print them as one line and exit with status 2."""

import argparse


class UserError(Exception):
    """Bad input or arguments: message names the problem; no traceback is shown."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: message (see prog --help)` on stderr, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
