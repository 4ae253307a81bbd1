"""Never lose a run: train.py --resume, kills, Ctrl-C, --keep and a loss that is not finite."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    assert_same_training,
    epoch_checkpoints,
    load,
    one_error_line,
    run_cli,
    train_argv,
)

import train


def epochs_in(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("model-*.pth"))


def test_resume_continues_the_schedule_and_files(demo_flowers, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(train_argv(demo_flowers, full, epochs=3)) == 0
    # Stopping after epoch 1 by asking for 2 epochs of a 3-epoch schedule is not the same
    # run; instead take the 3-epoch run's files (a second identical run would write the
    # same), drop the last checkpoint as if killed, and resume.
    shutil.copytree(full, part)
    (part / "weights" / "model-2.pth").unlink()
    assert train.main(train_argv(demo_flowers, part, epochs=3, resume="auto")) == 0

    assert epochs_in(part / "weights") == epochs_in(full / "weights") == [0, 1, 2]
    for epoch in range(3):
        # The report's cosine, written out: lr * ((1 + cos(pi * e / E)) / 2 * (1 - lrf) + lrf).
        expected = 0.01 * ((1 + math.cos(math.pi * epoch / 3)) / 2 * (1 - 0.01) + 0.01)
        resumed = load(part / "weights" / f"model-{epoch}.pth")
        whole = load(full / "weights" / f"model-{epoch}.pth")
        assert resumed["epoch"] == whole["epoch"] == epoch
        assert math.isclose(resumed["metrics"]["learning_rate"], expected, rel_tol=1e-9)
        assert math.isclose(whole["metrics"]["learning_rate"], expected, rel_tol=1e-9)
    # The resumed epoch 2 starts from the same weights, data order and RNG as the whole run.
    resumed, whole = load(part / "weights" / "model-2.pth"), load(full / "weights" / "model-2.pth")
    assert resumed["metrics"]["train_loss"] == pytest.approx(whole["metrics"]["train_loss"],
                                                            rel=1e-4)
    # The copy is resumed with its own --log-dir: its curves go on there, in a folder named as
    # the run's (copied along with it), not in the original run's folder.
    original = Path(load(part / "weights" / "model-0.pth")["log_dir"])
    assert original.parent == full / "runs"
    assert resumed["log_dir"] == str(part / "runs" / original.name)


def test_with_loader_workers_a_resumed_run_is_the_uninterrupted_run(demo_flowers, tmp_path):
    # Each image's random crop and flip come from a seed of its own (run seed, epoch, index),
    # not from the loader processes' generators, which no checkpoint holds: epoch 2 resumed
    # with two workers trains on what the uninterrupted run without workers trained on.
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(train_argv(demo_flowers, full, epochs=3, workers=0)) == 0
    shutil.copytree(full, part)
    (part / "weights" / "model-2.pth").unlink()
    assert train.main(train_argv(demo_flowers, part, epochs=3, workers=2, resume="auto")) == 0
    assert_same_training(epoch_checkpoints(full, 3), epoch_checkpoints(part, 3), atol=1e-6)


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("resume", [None, "from another folder"])
def test_a_second_run_into_a_folder_holding_a_run_is_refused_before_writing(demo_flowers,
                                                                             tmp_path, resume):
    assert train.main(train_argv(demo_flowers, tmp_path, epochs=3, batch_size=30)) == 0
    before = files_in(tmp_path)
    extra = []
    if resume:
        other = tmp_path / "other"
        assert train.main(train_argv(demo_flowers, other, batch_size=30)) == 0
        extra, before = ["--resume", other / "weights" / "model-0.pth"], files_in(tmp_path)
    # A shorter run would replace best.pth and model-0.pth and leave model-1 and model-2.
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, *extra,
                                                  batch_size=30))
    line = one_error_line(code, err)
    folder = tmp_path / "weights"
    assert f"--output-dir {folder} already holds a training run" in line, line
    assert "best.pth" in line and "model-0.pth ... model-2.pth" in line, line
    assert "--resume auto" in line and "another --output-dir" in line, line
    assert files_in(tmp_path) == before  # not even a TensorBoard folder or class_indices.json


def test_an_earlier_demo_run_is_replaced_and_said_so(demo_flowers, tmp_path):
    # `python train.py --demo` twice, or the demo and then a real run, into ./weights.
    assert train.main(train_argv(demo_flowers, tmp_path, "--demo", epochs=2,
                                 batch_size=30)) == 0
    code, out, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, batch_size=30))
    assert code == 0, err
    assert "replaced the earlier --demo run" in out
    assert epochs_in(tmp_path / "weights") == [0]  # the demo's model-1.pth went with it
    assert load(tmp_path / "weights" / "best.pth")["args"]["demo"] is False
    # That run was no demo: a demo after it is refused like any other run.
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, "--demo",
                                                  batch_size=30))
    assert "already holds a training run" in one_error_line(code, err)


def test_resume_errors_are_one_line(demo_flowers, tmp_path, capsys):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"not a checkpoint")
    assert train.main(train_argv(demo_flowers, tmp_path, resume=bogus)) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert train.main(train_argv(demo_flowers, tmp_path, resume=tmp_path / "no")) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    exported = tmp_path / "vit.pt"  # what export.py writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(exported))
    assert train.main(train_argv(demo_flowers, tmp_path, resume=exported)) == 2
    assert capsys.readouterr().err == (f"error: --resume {exported} is a TorchScript export, "
                                       f"which holds no training state; pass the run's newest "
                                       f"model-*.pth.\n")
    folder = tmp_path / "a_run"
    folder.mkdir()
    assert train.main(train_argv(demo_flowers, tmp_path, resume=folder)) == 2
    assert capsys.readouterr().err == (f"error: --resume {folder} is a folder; pass one of its "
                                       f"model-*.pth, or --resume auto --output-dir {folder}.\n")


def test_keep_prunes_old_epoch_checkpoints_but_not_best(demo_flowers, tmp_path):
    assert train.main(train_argv(demo_flowers, tmp_path, epochs=2, keep=1)) == 0
    assert epochs_in(tmp_path / "weights") == [1]
    assert (tmp_path / "weights" / "best.pth").is_file()


@pytest.mark.parametrize("when", ["after a good epoch", "in a new run's first epoch",
                                  "in a resumed run's first epoch"])
def test_a_non_finite_loss_stops_with_status_1_naming_epoch_and_step_and_keeps_good_files(
        demo_flowers, tmp_path, when):
    out = tmp_path / "weights"
    # Epoch 0 trains at lr 0.01; --lrf 1e30 makes epoch 1's lr about 5e27, which blows up.
    argv, failing_epoch = train_argv(demo_flowers, tmp_path, epochs=2, lrf=1e30,
                                     batch_size=25), 1  # few steps: NaN math is slow
    if when == "in a new run's first epoch":
        # The run's first update blows the weights up, so the loss of its step 1 is not finite.
        argv, failing_epoch = train_argv(demo_flowers, tmp_path, epochs=2, lr=1e30,
                                         batch_size=25), 0
    elif when == "in a resumed run's first epoch":
        # The run above, stopped as in the first case, then resumed: it stops again in its
        # first epoch, before it wrote anything.
        assert run_cli(train.main, argv)[0] == 1
        argv = [*argv, "--resume", "auto"]
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(train.main, argv)
    line = one_error_line(code, err, status=1)
    assert re.search(rf"NaN or infinite at epoch {failing_epoch}, step \d+;", line), line

    assert not (out / "model-1.pth").exists()
    if when == "in a new run's first epoch":  # nothing to keep: no checkpoint was written
        assert "step 1;" in line
        assert not list(out.glob("*.pth"))
        return
    if when == "in a resumed run's first epoch":  # nothing of the failed run was written
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert "step 1;" in line
    for name in ("model-0.pth", "best.pth"):
        checkpoint = load(out / name)
        assert checkpoint["epoch"] == 0
        assert math.isfinite(checkpoint["metrics"]["train_loss"])
        for key, value in checkpoint["model"].items():
            assert torch.isfinite(value).all(), (name, key)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The child gets Python's own Ctrl-C handling even when pytest runs with SIGINT ignored
    # (started with nohup ... &), which the child would otherwise inherit.
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume(demo_flowers, tmp_path):
    # Batch 2 makes an epoch long enough (about 24 steps) to be killed inside.
    args = train_argv(demo_flowers, tmp_path, epochs=3, batch_size=2)
    proc = _start(args, tmp_path)
    _wait_for(tmp_path / "weights" / "model-0.pth", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survivors = epochs_in(tmp_path / "weights")
    assert survivors and survivors[-1] < 2
    for epoch in survivors:  # every checkpoint on disk is complete and loads
        assert load(tmp_path / "weights" / f"model-{epoch}.pth")["epoch"] == epoch

    # Resumed with larger batches: the same run goes on, in a few steps an epoch.
    assert train.main([*args, "--resume", "auto", "--batch-size", "25"]) == 0
    assert epochs_in(tmp_path / "weights") == [0, 1, 2]
    assert load(tmp_path / "weights" / "model-2.pth")["epoch"] == 2


# SIGTERM is what Slurm, docker stop, systemd and `timeout` send: the same as Ctrl-C, but 143.
@pytest.mark.parametrize(("stop", "status", "said"), [
    (signal.SIGINT, 130, "Interrupted in epoch"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "Stopped by SIGTERM in epoch"),
], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_and_exits_cleanly(demo_flowers, tmp_path, stop, status, said):
    args = train_argv(demo_flowers, tmp_path, epochs=3, batch_size=2)
    proc = _start(args, tmp_path)
    _wait_for(tmp_path / "weights" / "model-0.pth", proc)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert said in err and "--resume auto" in err, err
    interrupted = load(tmp_path / "weights" / "interrupted.pth")
    assert interrupted["class_names"] and "model" in interrupted
    assert load(tmp_path / "weights" / "model-0.pth")["epoch"] == 0

    # Resumed to the end (in larger batches), the run's newer checkpoints supersede the
    # mid-epoch weights: interrupted.pth is gone, and no later look at the folder finds it.
    assert train.main([*args, "--resume", "auto", "--batch-size", "25"]) == 0
    assert epochs_in(tmp_path / "weights") == [0, 1, 2]
    assert not (tmp_path / "weights" / "interrupted.pth").exists()


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler in this process, even where pytest started with SIGINT
    ignored (nohup ... &); put back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_while_saving_keeps_the_save_and_the_resume_hint(
        demo_flowers, tmp_path, monkeypatch, python_ctrl_c):
    real_epoch, real_save = train.train_and_validate, torch.save

    def ctrl_c_in_epoch_1(epoch, *args):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_epoch(epoch, *args)

    def ctrl_c_again_while_saving(obj, path, *args, **kwargs):  # a double press
        if Path(path).name == ".interrupted.pth.tmp":
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train, "train_and_validate", ctrl_c_in_epoch_1)
    monkeypatch.setattr(torch, "save", ctrl_c_again_while_saving)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, epochs=3))
    assert code == 130, err
    assert "Interrupted in epoch 1" in err and "--resume auto" in err, err
    assert "Traceback" not in err
    assert load(tmp_path / "weights" / "interrupted.pth")["interrupted_in_epoch"] == 1
    # main() puts back the handlers it found: tests, reproduce.py and benchmark.py call it.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == sigterm_before


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_in_its_first_epoch_starts_again_with_resume_auto(
        demo_flowers, tmp_path, monkeypatch, python_ctrl_c, stop, status):
    # Nothing is complete yet: interrupted.pth alone, which --resume auto must not refuse.
    real_epoch = train.train_and_validate

    def stopped_in_epoch_0(epoch, *args):
        if epoch == 0:
            os.kill(os.getpid(), stop)
        return real_epoch(epoch, *args)

    monkeypatch.setattr(train, "train_and_validate", stopped_in_epoch_0)
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, epochs=2))
    assert code == status, err
    assert "in epoch 0" in err and "--resume auto (it starts the first epoch again)" in err, err
    folder = tmp_path / "weights"
    assert sorted(p.name for p in folder.glob("*.pth")) == ["interrupted.pth"]
    monkeypatch.undo()
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, epochs=2,
                                                  resume="auto"))
    assert code == 0, err
    assert epochs_in(folder) == [0, 1] and not (folder / "interrupted.pth").exists()
