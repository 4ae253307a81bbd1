"""A disk that refuses to grow files, for the tests of what a failed write leaves behind.

The kernel's file-size limit (RLIMIT_FSIZE) makes every write past the limit fail with
EFBIG ("File too large"), as a full disk fails with ENOSPC: a real failure that every
writer meets, Python's and the C code's of matplotlib and torch alike, without mounting a
small file system (which CI machines do not permit) and without patching the writers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def _lower_limit(max_bytes: int) -> tuple[int, int]:
    """Lower the soft limit to max_bytes (the hard one stays, so it can be raised back) and
    ignore SIGXFSZ, which would otherwise kill the process at the first refused write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        max_bytes = min(max_bytes, hard)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    return soft, hard


@contextlib.contextmanager
def files_limited_to(max_bytes: int = 0) -> Iterator[None]:
    """Within the block, no file of this process grows beyond max_bytes (0: none grows)."""
    previous = signal.getsignal(signal.SIGXFSZ)
    soft, hard = _lower_limit(max_bytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def run_with_files_limited_to(max_bytes: int, code: str, cwd: Path
                              ) -> subprocess.CompletedProcess:
    """Run `python -c code` with the limit in a process of its own, in cwd, the repository's
    modules importable: for a writer that used to abort the interpreter, which in this
    process would end the test run."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, preexec_fn=lambda: _lower_limit(max_bytes), timeout=300)


def assert_only(folder: Path, names: list[str]) -> None:
    """folder holds exactly these files: no temporary file is left beside them."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
