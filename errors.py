"""The project's error types, in one module that imports nothing of ours.

Every error a user can act on derives from ProjectError: the command-line scripts print
it as one line, ``error: <message>``, and exit with its exit_code (cli.run_main). Other
exceptions are bugs and keep their traceback. The helpers at the end turn a failed write
into a WriteError, and check an output path before the work that fills it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


# What to do about a failed write, by the system's error number; any other: write_hint's last.
_WRITE_HINTS = {errno.EACCES: "check the folder's permissions",
                errno.EPERM: "check the folder's permissions",
                errno.EROFS: "check the folder's permissions",
                errno.ENOSPC: "free some space",
                errno.EDQUOT: "free some space"}


def write_hint(code: int | None) -> str:
    """What to do about a write that failed with the error number code (None: unknown)."""
    return _WRITE_HINTS.get(code, "check the folder and the free space")


def write_error(path: object, err: Exception) -> WriteError:
    """The one sentence for a failed write: which file, the system's reason, what to do."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else None
    code = err.errno if isinstance(err, OSError) else None
    if reason is None and isinstance(err, RuntimeError):
        # PyTorch's C++ file writer reports OS errors as RuntimeErrors: a failed open names
        # the system's reason (strerror's text, no number) after "strerror:"; without one,
        # a full disk is the best guess.
        _, found, after = str(err).rpartition("strerror:")
        reason = after.strip() if found else "the write failed; is the disk full?"
        code = next((c for c in _WRITE_HINTS if os.strerror(c) == reason), None)
    reason = reason or err
    return WriteError(f"Cannot write {path} ({reason}); {write_hint(code)}.")


@contextmanager
def writing(path: object) -> Iterator[None]:
    """Turn an OSError raised inside the block into a WriteError naming its file, else path."""
    try:
        yield
    except OSError as err:  # the file the system names is the most precise culprit
        raise write_error(err.filename or path, err) from None


def check_output_file(path: str | Path, flag: str) -> Path:
    """Path, once it is known that a file can be created there: raise UserError, before any
    work is done, when a folder is in the way, a file stands where a folder should be, or
    the folder refuses new files (permissions, a read-only file system)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; name a file to write instead.")
        _check_files_can_be_created(path.parent, flag, path)
    except OSError as err:  # e.g. a name longer than the file system allows
        raise UserError(f"{flag} {path} cannot be written ({err.strerror}).") from None
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Path, once it is known that it is, or mkdir -p can make it, a folder that takes new
    files; UserError otherwise, before any work is done. Makes nothing (make_output_dir does)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder; pass a folder.")
        _check_files_can_be_created(path, flag, path)
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be written ({err.strerror}).") from None
    return path


def _check_files_can_be_created(folder: Path, flag: str, target: Path) -> None:
    """UserError unless new files can be made in folder or, where it does not exist yet, in
    the nearest parent that does (mkdir -p makes the rest)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        raise UserError(f"Cannot write {target}: {existing} is a file, not a folder.")
    try:
        # A probe rather than os.access: it also sees read-only mounts and file systems that
        # refuse even root, and gives the system's reason. Unnamed where the system allows
        # (O_TMPFILE), and removed on close, so nothing is left behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {target}: no file can be created in {existing} "
                        f"({err.strerror}); {write_hint(err.errno)}.") from None


def make_output_dir(path: str | Path, flag: str) -> Path:
    """mkdir -p path, after check_output_dir; a mkdir that still fails is a WriteError."""
    path = check_output_dir(path, flag)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path
