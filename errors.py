"""The project's error types, in one module that imports nothing of ours.

Every error a user can act on derives from ProjectError: the command-line scripts print
it as one line, ``error: <message>``, and exit with its exit_code (cli.run_main). Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations


class ProjectError(Exception):
    """An error with one sentence the user can act on; exit status 2 unless said otherwise."""

    exit_code = 2


class UserError(ProjectError):
    """Bad input from the user: a flag out of range, a missing file, a wrong folder."""


class WeightsError(UserError):
    """A weights file that cannot be read or does not fit the model."""


class DownloadError(ProjectError):
    """A download that failed or gave something other than what was expected."""


class NonFiniteLossError(ProjectError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""

    exit_code = 1


class WriteError(ProjectError):
    """A file could not be written (disk full, read-only, a folder in the way)."""

    exit_code = 1
