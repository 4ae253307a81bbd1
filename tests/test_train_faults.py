"""Hostile inputs and faults in train.py: bad flags, killed and failed writes, two runs into
one folder, changed flags on resume, Ctrl-C while importing (issue 12's train-side cases)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load, one_error_line, run_cli, train_argv

import train
from checkpoints import (
    BEST_FILE,
    LOCK_FILE,
    Checkpoint,
    epoch_checkpoints,
    epoch_file,
    newest_epoch_checkpoint,
    prune_checkpoints,
    restore_best,
    save_checkpoint,
)
from utils import SEED_LIMIT


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 classes x 5 images: 4 to train and 1 to validate on per class."""
    from demo_data import make_demo_flowers

    return make_demo_flowers(tmp_path_factory.mktemp("faults") / "flowers", per_class=5,
                             size=32)


def args_for(data: Path, root: Path, *extra: str) -> list[str]:
    """One epoch in batches of 4 into root/out and root/logs, with train.py's own --lr and
    --freeze-layers."""
    return train_argv(data, root, *extra, batch_size=4, lr=None, freeze_layers=None,
                      output_dir=root / "out", log_dir=root / "logs")


@pytest.fixture(scope="module")
def two_epochs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run, trained once for the tests that resume it (see resumable).

    Started in its own folder with relative paths, so its checkpoints name out/ and logs/
    relative to where they were written: a copy resumed in another folder writes there.
    """
    root = tmp_path_factory.mktemp("two_epochs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code, _, err = run_cli(train.main, args_for(data, Path("."), "--epochs", "2"))
    assert code == 0, err
    return root


@pytest.fixture
def resumable(two_epochs: Path, data: Path, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """This test's own copy of two_epochs in tmp_path (the working directory) and the argv
    that made it; out/ and logs/ are tmp_path's."""
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return args_for(data, Path("."), "--epochs", "2")


# --------------------------------------------------------------------------- bad flags

BAD_FLAGS = [
    ["--clip-grad", "0"], ["--clip-grad", "-1"], ["--clip-grad", "nan"],
    ["--lrf", "-5"], ["--lrf", "nan"], ["--lrf", "inf"],
    ["--img-size", "0"], ["--img-size", "-16"], ["--img-size", "60"], ["--img-size", "800000"],
    ["--warmup-epochs", "-3"], ["--warmup-epochs", "1"],
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--lr", "-0.1"],
    ["--workers", "-1"], ["--val-batch-size", "0"], ["--val-batch-size", "-1"],
    ["--momentum", "-1"], ["--momentum", "1"], ["--momentum", "nan"],
    ["--wd", "-1"], ["--wd", "nan"],
    ["--label-smoothing", "2"], ["--label-smoothing", "1"], ["--label-smoothing", "-0.1"],
    ["--drop-path", "1.5"], ["--drop-path", "1"], ["--drop-path", "-0.1"],
    ["--epochs", "0"], ["--batch-size", "0"], ["--accum-steps", "0"],
    ["--val-rate", "0"], ["--val-rate", "1"], ["--val-rate", "nan"],
    ["--keep", "0"], ["--keep", "-1"], ["--num-classes", "0"], ["--frozen-batch", "-1"],
    ["--seed", "-1"], ["--seed", str(SEED_LIMIT)], ["--seed", "99999999999999999999999"],
]


@pytest.mark.parametrize("bad", BAD_FLAGS, ids=" ".join)
def test_a_flag_out_of_range_stops_before_anything_is_written(data, tmp_path, bad):
    code, _, err = run_cli(train.main, args_for(data, tmp_path, *bad))
    assert bad[0] in one_error_line(code, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_the_largest_seed_trains(data, tmp_path):
    # The sampler seeds torch's generator with seed * 100_003 + epoch, which must stay below
    # 2**64: a seed of 2**63 - 1 passes torch.manual_seed but fails there, in the first epoch.
    code, _, err = run_cli(train.main, args_for(data, tmp_path, "--seed",
                                                str(SEED_LIMIT - 1)))
    assert code == 0, err
    assert load(tmp_path / "out" / "model-0.pth")["args"]["seed"] == SEED_LIMIT - 1


@pytest.mark.parametrize("flag", ["--output-dir", "--log-dir"])
@pytest.mark.parametrize("below", [False, True])
def test_an_output_folder_that_is_a_file_is_bad_input(data, tmp_path, flag, below):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    folder = a_file / "sub" if below else a_file
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), flag, str(folder)])
    line = one_error_line(code, err)
    assert flag in line and str(a_file) in line, line
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("flag", ["--output-dir", "--log-dir"])
@pytest.mark.parametrize("where", ["inside", "empty"])
def test_an_output_folder_inside_the_data_or_empty_is_bad_input(data, tmp_path, flag,
                                                                 where):
    # Inside the data folder it would become a class of the next run.
    folder = str(data / "weights") if where == "inside" else ""
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), flag, folder])
    assert flag in one_error_line(code, err)
    assert not (data / "weights").exists() and not (tmp_path / "out").exists()


def test_an_unreadable_weights_file_is_one_line(data, tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"\0" * 64)
    real_open = Path.open

    def no_permission(path, *args, **kwargs):  # root reads anything: inject the refusal
        if path == weights:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_permission)
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), "--weights", str(weights)])
    assert "Permission denied" in one_error_line(code, err)


def test_a_weights_folder_that_is_not_hugging_face_is_one_line(data, tmp_path):
    folder = tmp_path / "not_hf"
    folder.mkdir()
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), "--weights", str(folder)])
    assert str(folder) in one_error_line(code, err)


# --------------------------------------------------------------------------- data

def test_an_empty_class_folder_is_named_once(data, tmp_path):
    copy = tmp_path / "flowers"
    shutil.copytree(data, copy)
    (copy / "aaa_empty").mkdir()  # sorts first: class 0, as the reproduced code numbers it
    code, out, err = run_cli(train.main, args_for(copy, tmp_path))
    assert code == 0, err
    warnings = [line for line in out.splitlines() if "aaa_empty" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), out
    assert "class 0" in warnings[0]
    assert load(tmp_path / "out" / "model-0.pth")["class_names"][0] == "aaa_empty"


def test_an_unreadable_class_folder_is_one_line(data, tmp_path, monkeypatch):
    real_iterdir = Path.iterdir

    def no_permission(path):  # root lists anything: inject the refusal
        if path == data / "roses":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", no_permission)
    code, _, err = run_cli(train.main, args_for(data, tmp_path))
    assert str(data / "roses") in one_error_line(code, err)


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An empty folder on a file system mounted read-only: even root cannot write in it."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"mounting a read-only tmpfs is not permitted here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("flag", ["--output-dir", "--log-dir"])
@pytest.mark.parametrize("below", [False, True])
def test_a_read_only_output_folder_is_refused_before_anything_is_written(
        data, tmp_path, read_only_folder, flag, below):
    folder = read_only_folder / "sub" if below else read_only_folder
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), flag, str(folder)])
    line = one_error_line(code, err)
    assert flag in line and str(read_only_folder) in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_a_log_folder_that_fails_late_leaves_nothing_behind(data, tmp_path, read_only_folder,
                                                            monkeypatch):
    # A folder that passes the up-front check and then refuses (a server's rules, a disk that
    # fills meanwhile): the run's own TensorBoard folder fails to be made.
    monkeypatch.setattr(train, "check_output_dir", lambda folder, flag: Path(folder))
    code, _, err = run_cli(train.main, [*args_for(data, tmp_path), "--log-dir",
                                        str(read_only_folder)])
    # make_output_dir probes the folder again before making the run's own folder in it.
    line = one_error_line(code, err)
    assert f"no file can be created in {read_only_folder}" in line and "Read-only" in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- best.pth

def best_epoch_by_val_acc(out: Path) -> int:
    scored = [(load(p)["metrics"]["val_acc"], -load(p)["epoch"]) for p in out.glob("model-*.pth")]
    return -max(scored)[1]


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage"])
def test_resume_rebuilds_a_lost_best_and_removes_stale_temporaries(resumable, tmp_path,
                                                                   damage):
    out = tmp_path / "out"
    # What kill -9 during best.pth's write leaves: no best.pth (or a bad one) and a .tmp.
    {"missing": lambda p: p.unlink(), "empty": lambda p: p.write_bytes(b""),
     "garbage": lambda p: p.write_bytes(b"PK\3\4 not a checkpoint")}[damage](out / BEST_FILE)
    (out / f".{BEST_FILE}.tmp").write_bytes(b"")

    code, out_text, err = run_cli(train.main, [*resumable, "--resume", "auto"])  # no epochs
    assert code == 0, err
    assert load(out / BEST_FILE)["epoch"] == best_epoch_by_val_acc(out)
    assert not list(out.glob(".*.tmp"))
    assert "best.pth" in out_text and "removed" in out_text


def test_a_good_best_is_left_alone(resumable, tmp_path):
    best = (tmp_path / "out" / BEST_FILE).read_bytes()
    code, out, _ = run_cli(train.main, [*resumable, "--resume", "auto"])
    assert code == 0 and "nothing more to train" in out
    assert (tmp_path / "out" / BEST_FILE).read_bytes() == best


def set_val_acc(path: Path, val_acc: float) -> None:
    """Give an epoch checkpoint another validation accuracy (and best_acc), in place."""
    checkpoint = load(path)
    checkpoint["metrics"]["val_acc"] = checkpoint["best_acc"] = val_acc
    torch.save(checkpoint, path)


def test_a_run_killed_before_its_best_pth_was_written_never_loses_those_weights(resumable,
                                                                                tmp_path):
    # What kill -9 leaves after model-1.pth, a new best, and before best.pth's rename:
    # best.pth is epoch 0's and a .tmp. Epoch 1 scores 1.0, so no later epoch beats it. The
    # run resumed with --keep 1 prunes model-1.pth after epoch 2: best.pth must have it by then.
    out = tmp_path / "out"
    set_val_acc(out / "model-0.pth", 0.2)
    shutil.copyfile(out / "model-0.pth", out / BEST_FILE)
    set_val_acc(out / "model-1.pth", 1.0)
    (out / f".{BEST_FILE}.tmp").write_bytes(b"")
    best_weights = load(out / "model-1.pth")["model"]

    code, text, err = run_cli(train.main, [*resumable, "--epochs", "4", "--keep", "1",
                                           "--resume", "auto"])
    assert code == 0, err
    assert f"copied {Path('out', 'model-1.pth')} to it" in text
    assert [path.name for _, path in epoch_checkpoints(out)] == ["model-3.pth"]
    best = load(out / BEST_FILE)
    assert best["epoch"] == 1 and best["metrics"]["val_acc"] == 1.0
    for key, value in best_weights.items():
        torch.testing.assert_close(best["model"][key], value, rtol=0, atol=0, msg=key)


def test_pruning_spares_the_only_copy_of_the_best_weights(tmp_path):
    for epoch, val_acc in enumerate([0.2, 0.9, 0.5, 0.4]):
        save_checkpoint(Checkpoint(model={"w": torch.full((1,), float(epoch))}, model_args={},
                                   epoch=epoch, metrics={"val_acc": val_acc}),
                        tmp_path / epoch_file(epoch))
    shutil.copyfile(tmp_path / "model-0.pth", tmp_path / BEST_FILE)  # epoch 1's never written
    prune_checkpoints(tmp_path, 1)
    assert [epoch for epoch, _ in epoch_checkpoints(tmp_path)] == [1, 3]
    assert restore_best(tmp_path) == tmp_path / "model-1.pth"
    prune_checkpoints(tmp_path, 1)  # best.pth holds epoch 1 now: its checkpoint may go
    assert [epoch for epoch, _ in epoch_checkpoints(tmp_path)] == [3]
    assert load(tmp_path / BEST_FILE)["epoch"] == 1


@pytest.mark.parametrize("resume", [["--resume", "auto"], []], ids=["resume auto", "new run"])
def test_a_folder_with_best_pth_but_no_epoch_checkpoint_is_not_started_afresh(resumable,
                                                                             tmp_path, resume):
    out = tmp_path / "out"
    for path in out.glob("model-*.pth"):
        path.unlink()
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    code, _, err = run_cli(train.main, [*resumable, *resume])
    line = one_error_line(code, err)
    assert "best.pth" in line and "pass another --output-dir" in line, line
    assert "continue it with --resume auto" not in line  # which would be refused as above
    if resume:
        assert "no model-*.pth to continue from" in line, line
        assert f"--weights {Path('out', BEST_FILE)}" in line, line
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_keep_applies_when_a_resumed_run_has_nothing_left_to_train(resumable, tmp_path):
    code, text, err = run_cli(train.main, [*resumable, "--keep", "1", "--resume", "auto"])
    assert code == 0 and "nothing more to train" in text, err
    assert [path.name for _, path in epoch_checkpoints(tmp_path / "out")] == ["model-1.pth"]


def test_a_folder_where_a_checkpoint_goes_is_refused_up_front(resumable, tmp_path):
    out = tmp_path / "out"
    (out / "model-3.pth").mkdir()  # a folder, not a checkpoint: not the run's newest
    assert newest_epoch_checkpoint(out) == out / "model-1.pth"
    code, _, err = run_cli(train.main, [*resumable, "--epochs", "5", "--resume", "auto"])
    line = one_error_line(code, err)
    assert f"{Path('out', 'model-3.pth')} is not a file" in line and "--output-dir" in line, line
    assert not (out / "model-2.pth").exists()  # refused before an epoch was trained


# --------------------------------------------------------------------------- failed writes

def fail_save_from(monkeypatch, call: int, error: int) -> None:
    """torch.save raises OSError(error) from its `call`-th call on."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= call:
            Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
            raise OSError(error, os.strerror(error), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


# In the last epoch or mid-run; a full disk, or a folder remounted read-only.
@pytest.mark.parametrize(("epochs", "error"), [(2, errno.ENOSPC), (4, errno.ENOSPC),
                                               (4, errno.EROFS)])
def test_a_failed_checkpoint_write_stops_the_run(data, tmp_path, monkeypatch, epochs,
                                                 error):
    # Calls 1 and 2 write epoch 0's model-0.pth and best.pth; call 3 is model-1.pth.
    fail_save_from(monkeypatch, 3, error)
    code, _, err = run_cli(train.main, args_for(data, tmp_path, "--epochs", str(epochs),
                                                "--no-freeze-layers"))
    out = tmp_path / "out"
    line = one_error_line(code, err, status=1)
    assert str(out / "model-1.pth") in line and os.strerror(error) in line, line
    assert f"last good checkpoint is {out / 'model-0.pth'}" in line, line
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "model-0.pth"]
    assert not list(out.glob(".*.tmp"))
    assert load(out / "model-0.pth")["epoch"] == load(out / BEST_FILE)["epoch"] == 0


def test_disk_full_on_a_real_tmpfs_stops_the_run(data, tmp_path):
    # Measure one checkpoint, then mount a tmpfs with room for model-0.pth and best.pth only.
    assert run_cli(train.main, args_for(data, tmp_path / "measure", "--no-freeze-layers"))[0] == 0
    size = (tmp_path / "measure" / "out" / "model-0.pth").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 5 // 2}", "tmpfs",
                            str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here: {mount.stderr.strip()}")
    try:
        code, _, err = run_cli(train.main, [
            *args_for(data, tmp_path, "--epochs", "4", "--no-freeze-layers"),
            "--output-dir", str(disk)])
        line = one_error_line(code, err, status=1)
        assert "model-1.pth" in line and f"{disk / 'model-0.pth'}" in line, line
        assert load(disk / "model-0.pth")["epoch"] == 0
        assert not (disk / "model-2.pth").exists() and not list(disk.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # -l: even if a file is open


@pytest.mark.parametrize("failing", ["add_scalar", "flush"])
def test_a_full_log_disk_costs_the_curves_not_an_epoch(data, tmp_path, monkeypatch, failing):
    from torch.utils.tensorboard import SummaryWriter

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_close = SummaryWriter.close

    def close_on_a_full_disk(writer):
        real_close(writer)
        full_disk()

    monkeypatch.setattr(SummaryWriter, failing, full_disk)
    monkeypatch.setattr(SummaryWriter, "close", close_on_a_full_disk)  # fails again at the end
    code, text, err = run_cli(train.main, args_for(data, tmp_path, "--epochs", "2"))
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in text.splitlines() if "TensorBoard cannot" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), text
    assert str(tmp_path / "logs") in warnings[0] and os.strerror(errno.ENOSPC) in warnings[0]
    assert [load(path)["epoch"] for _, path in epoch_checkpoints(tmp_path / "out")] == [0, 1]
    assert "no curves" in text.splitlines()[-1]


def test_a_full_disk_while_claiming_the_folder_is_one_line_and_leaves_no_lock(data, tmp_path,
                                                                              monkeypatch):
    def full_disk(*args):  # the lock file is made; writing the pid into it fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    code, _, err = run_cli(train.main, args_for(data, tmp_path))
    line = one_error_line(code, err, status=1)
    assert str(tmp_path / "out" / LOCK_FILE) in line and os.strerror(errno.ENOSPC) in line, line
    assert not (tmp_path / "out").exists()  # no lock file, and so no folder, left behind


# --------------------------------------------------------------------------- two runs

def test_a_second_run_into_a_folder_in_use_is_refused(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # what a running train.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        code, _, err = run_cli(train.main, args_for(data, tmp_path))
    line = one_error_line(code, err)
    assert str(out) in line and "in use" in line and "4242" in line, line
    assert not list(out.glob("*.pth"))


def test_a_lock_file_left_by_a_dead_run_does_not_block(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # a killed run's file; the kernel dropped its lock
    code, _, err = run_cli(train.main, args_for(data, tmp_path))
    assert code == 0, err
    assert (out / "model-0.pth").is_file()
    assert not (out / LOCK_FILE).exists()  # a run removes its lock file when it ends


# --------------------------------------------------------------------------- resume

@pytest.mark.parametrize(("first", "second", "named"), [
    (["--no-freeze-layers"], [], "--no-freeze-layers"),
    ([], ["--no-freeze-layers"], "--freeze-layers"),
    ([], ["--opt", "adamw"], "--opt sgd"),
])
def test_resume_with_a_flag_that_changes_the_optimizer_names_it(data, tmp_path, request,
                                                                first, second, named):
    if first:  # a first run of its own
        argv = args_for(data, tmp_path, "--epochs", "2", *first)
        assert run_cli(train.main, argv)[0] == 0
    else:  # the shared first run, copied to tmp_path
        argv = request.getfixturevalue("resumable")
    (tmp_path / "out" / "model-1.pth").unlink()
    resumed = [arg for arg in argv if arg != "--no-freeze-layers"] + second
    code, _, err = run_cli(train.main, [*resumed, "--resume", "auto"])
    assert f"with {named}," in one_error_line(code, err)
    assert not (tmp_path / "out" / "model-1.pth").exists()


@pytest.mark.parametrize("given", [True, False])
def test_a_log_dir_given_on_resume_wins_over_the_runs_own(resumable, tmp_path, given):
    stored = Path(load(tmp_path / "out" / "model-1.pth")["log_dir"])
    at = resumable.index("--log-dir")
    argv = [*resumable[:at], *resumable[at + 2:], "--epochs", "3", "--resume", "auto"]
    if given:  # a copied run, or its log disk full: its curves go on in a folder of that name
        argv += ["--log-dir", "new_logs"]
    code, text, err = run_cli(train.main, argv)
    assert code == 0, err
    used = Path("new_logs") / stored.name if given else stored
    assert load(tmp_path / "out" / "model-2.pth")["log_dir"] == str(used)
    assert f"curves in {used} " in text
    assert list(used.glob("events.out.tfevents.*"))
    assert ("note: the curves go on in new_logs" in text) == given


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(resumable):
    newest = Path("out", "model-1.pth")  # as --output-dir names it
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk error, not a kill: writes are atomic
    code, out, err = run_cli(train.main, [*resumable, "--resume", "auto"])
    assert code == 0, err
    assert f"passing over {newest}, which cannot be read" in out, out
    assert "pick an earlier" not in out  # advice for --resume FILE; auto has picked one
    assert "model-0.pth (epoch 0 done)" in out
    assert load(newest)["epoch"] == 1  # trained again and written whole


def test_resume_notes_the_settings_it_takes_from_the_checkpoint(resumable, tmp_path):
    (tmp_path / "out" / "model-1.pth").unlink()
    code, out, err = run_cli(train.main, [*resumable, "--lr", "0.5", "--resume", "auto"])
    assert code == 0, err
    assert "keeps its --lr 0.001" in out
    assert load(tmp_path / "out" / "model-1.pth")["optimizer"]["param_groups"][0][
        "initial_lr"] == pytest.approx(0.001)


# --------------------------------------------------------------------------- Ctrl-C

# Runs train.py as `python train.py` does, and presses Ctrl-C at a fixed moment: when the
# import of torch begins, seconds before main() can catch anything.
CTRL_C_WHILE_IMPORTING = """
import os, runpy, signal, sys

class CtrlCOnTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCOnTorch())
sys.argv = ["train.py", "--help"]
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_while_modules_import_exits_130_in_one_line():
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
        # Python's own handler, however pytest was started (a background job ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "Interrupted.", result.stderr


def test_a_reader_that_goes_away_ends_a_command_quietly(monkeypatch, capsys):
    # `python predict.py FOLDER --json | head -1`: head exits, the next write meets a closed
    # pipe. The command stops with a shell's SIGPIPE status and no traceback.
    from cli import run_main

    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        status = run_main(lambda args: print("line\n" * 20000) or 0, None)
        monkeypatch.undo()
    assert status == 141
    assert capsys.readouterr().err == ""
