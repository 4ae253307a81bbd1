"""Never lose a run: resume, kills, Ctrl-C, NaN, --keep, two-process DDP, recipe options."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from utils import lr_lambda

ROOT = Path(__file__).resolve().parents[1]


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--model-name", "vit_demo_patch8_64", "--weights", "",
            "--no-freeze-layers", "--device", "cpu", "--workers", "0", "--batch-size", "8",
            "--lr", "0.01", "--output-dir", str(out / "weights"), "--log-dir", str(out / "runs"),
            *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epochs_in(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("model-*.pth"))


def test_resume_continues_the_schedule_and_files(demo_flowers, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(base_args(demo_flowers, full, "--epochs", "3")) == 0
    # Stop after epoch 1 by asking for 2 epochs of a 3-epoch schedule is not the same
    # run; instead run 3 epochs, drop the last checkpoint as if killed, and resume.
    assert train.main(base_args(demo_flowers, part, "--epochs", "3")) == 0
    (part / "weights" / "model-2.pth").unlink()
    assert train.main(base_args(demo_flowers, part, "--epochs", "3", "--resume", "auto")) == 0

    assert epochs_in(part / "weights") == epochs_in(full / "weights") == [0, 1, 2]
    factor = lr_lambda(3, 0.01)
    for epoch in range(3):
        resumed = load(part / "weights" / f"model-{epoch}.pth")
        whole = load(full / "weights" / f"model-{epoch}.pth")
        assert resumed["epoch"] == whole["epoch"] == epoch
        assert math.isclose(resumed["metrics"]["learning_rate"], 0.01 * factor(epoch))
        assert math.isclose(whole["metrics"]["learning_rate"], 0.01 * factor(epoch))
    # The resumed epoch 2 starts from the same weights, data order and RNG as the whole run.
    resumed, whole = load(part / "weights" / "model-2.pth"), load(full / "weights" / "model-2.pth")
    assert resumed["metrics"]["train_loss"] == pytest.approx(whole["metrics"]["train_loss"],
                                                            rel=1e-4)
    assert resumed["log_dir"] == load(part / "weights" / "model-0.pth")["log_dir"]


def test_resume_errors_are_one_line(demo_flowers, tmp_path, capsys):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"not a checkpoint")
    assert train.main(base_args(demo_flowers, tmp_path, "--resume", str(bogus))) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert train.main(base_args(demo_flowers, tmp_path, "--resume", str(tmp_path / "no"))) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_keep_prunes_old_epoch_checkpoints_but_not_best(demo_flowers, tmp_path):
    assert train.main(base_args(demo_flowers, tmp_path, "--epochs", "3", "--keep", "1")) == 0
    assert epochs_in(tmp_path / "weights") == [2]
    assert (tmp_path / "weights" / "best.pth").is_file()


def test_nan_loss_stops_with_epoch_and_step_and_keeps_good_checkpoints(
        demo_flowers, tmp_path, capsys):
    out = tmp_path
    assert train.main(base_args(demo_flowers, out, "--epochs", "1")) == 0
    before = (out / "weights" / "model-0.pth").read_bytes()
    # A second run into the same folder with an absurd learning rate: the first update
    # blows the weights up and the loss of step 1 is no longer finite.
    code = train.main(base_args(demo_flowers, out, "--epochs", "2", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN or infinite at epoch 0, step 1;" in err
    assert "Traceback" not in err
    assert (out / "weights" / "model-0.pth").read_bytes() == before
    assert not (out / "weights" / "model-1.pth").exists()


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume(demo_flowers, tmp_path):
    # Batch 2 makes an epoch long enough (about 24 steps) to be killed inside.
    args = base_args(demo_flowers, tmp_path, "--epochs", "3", "--batch-size", "2")
    proc = _start(args, tmp_path)
    _wait_for(tmp_path / "weights" / "model-0.pth", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survivors = epochs_in(tmp_path / "weights")
    assert survivors and survivors[-1] < 2
    for epoch in survivors:  # every checkpoint on disk is complete and loads
        assert load(tmp_path / "weights" / f"model-{epoch}.pth")["epoch"] == epoch

    assert train.main([*args, "--resume", "auto"]) == 0
    assert epochs_in(tmp_path / "weights") == [0, 1, 2]
    assert load(tmp_path / "weights" / "model-2.pth")["epoch"] == 2


def test_sigint_saves_and_exits_cleanly(demo_flowers, tmp_path):
    args = base_args(demo_flowers, tmp_path, "--epochs", "3", "--batch-size", "2")
    proc = _start(args, tmp_path)
    _wait_for(tmp_path / "weights" / "model-0.pth", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume auto" in err
    interrupted = load(tmp_path / "weights" / "interrupted.pth")
    assert interrupted["class_names"] and "model" in interrupted
    assert load(tmp_path / "weights" / "model-0.pth")["epoch"] == 0


def test_torchrun_two_processes_match_one(demo_flowers, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(base_args(demo_flowers, single, "--epochs", "1")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *base_args(demo_flowers, double, "--epochs", "1")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("images were found in the dataset.") == 1  # rank 0 only
    one, two = load(single / "weights" / "model-0.pth"), load(double / "weights" / "model-0.pth")
    assert two["samples"] == one["samples"] == {"train": 50, "val": 10}
    assert sorted(p.name for p in (double / "weights").iterdir()) == [
        "best.pth", "class_indices.json", "model-0.pth"]
    assert len(list((double / "runs").rglob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("extra", [
    ["--opt", "adamw", "--lr", "0.001", "--wd", "0.05", "--warmup-epochs", "1"],
    ["--clip-grad", "1", "--label-smoothing", "0.1", "--accum-steps", "3", "--drop-path", "0.1"],
    ["--no-augment", "--amp"],
])
def test_recipe_options_train(demo_flowers, tmp_path, extra):
    assert train.main(base_args(demo_flowers, tmp_path, "--epochs", "2", *extra)) == 0
    last = load(tmp_path / "weights" / "model-1.pth")
    assert all(math.isfinite(v) for v in last["metrics"].values())
    assert last["args"]["accum_steps"] == (3 if "--accum-steps" in extra else 1)
