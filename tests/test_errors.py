"""errors.py: the sentence for a failed write names the file, the system's reason, and a hint
that follows the reason; the checks before the work refuse a folder that takes no files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from errors import (
    UserError,
    WriteError,
    check_output_dir,
    check_output_file,
    make_output_dir,
    write_error,
    writing,
)


def test_a_full_disk_says_to_free_space():
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    # /dev/full accepts the open and fails every write with ENOSPC: a real full disk.
    with pytest.raises(WriteError) as caught, writing("/dev/full"), open("/dev/full", "w") as f:
        f.write("x")
    assert str(caught.value) == ("Cannot write /dev/full (No space left on device); free some "
                                 "space.")


def test_a_folder_that_refuses_files_says_to_check_its_permissions(unwritable_folder):
    target = unwritable_folder / "metrics.json"
    with pytest.raises(WriteError) as caught, writing(target):
        target.write_text("{}")
    message = str(caught.value)
    assert message.startswith(f"Cannot write {target} (")
    assert message.endswith("); check the folder's permissions.")


@pytest.mark.parametrize("code, hint", [
    (errno.EACCES, "check the folder's permissions"),
    (errno.EPERM, "check the folder's permissions"),
    (errno.EROFS, "check the folder's permissions"),
    (errno.ENOSPC, "free some space"),
    (errno.EDQUOT, "free some space"),
    (errno.ENAMETOOLONG, "check the folder and the free space"),
    (errno.EIO, "check the folder and the free space"),
])
def test_the_hint_follows_the_error_number(code, hint):
    reason = os.strerror(code)
    assert str(write_error("out.pt", OSError(code, reason))) == (f"Cannot write out.pt "
                                                                 f"({reason}); {hint}.")
    # PyTorch's C++ writer reports the same failure as a RuntimeError naming only the reason.
    torch_error = RuntimeError(f"[enforce fail at inline_container.cc:747] . open file failed "
                               f"with strerror: {reason}")
    assert str(write_error("out.pt", torch_error)) == f"Cannot write out.pt ({reason}); {hint}."


def test_a_torch_write_error_without_a_reason_keeps_the_general_hint():
    assert str(write_error("out.pt", RuntimeError("PytorchStreamWriter failed writing file"))) == (
        "Cannot write out.pt (the write failed; is the disk full?); check the folder and the "
        "free space.")


def test_the_checks_before_the_work_leave_nothing_behind(tmp_path):
    # The probe file that proves a folder takes new files must not stay there.
    assert check_output_dir(tmp_path / "new" / "folder", "--output-dir") == (
        tmp_path / "new" / "folder")
    assert check_output_file(tmp_path / "out.pt", "--output") == tmp_path / "out.pt"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("check", [check_output_file, check_output_dir, make_output_dir])
def test_a_folder_that_refuses_files_is_bad_input(unwritable_folder, check):
    target = unwritable_folder / "new" / "out.pt"
    with pytest.raises(UserError) as caught:
        check(target, "--flag")
    assert str(caught.value).startswith(f"--flag {target}: no file can be created in "
                                        f"{unwritable_folder} (")
    assert not (unwritable_folder / "new").exists()
