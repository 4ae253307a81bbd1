"""reproduce.py --quick end to end on a tiny synthetic data set, one epoch per run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load, one_error_line, run_cli
from write_faults import files_limited_to

import reproduce
import train
from checkpoints import Checkpoint, save_checkpoint
from demo_data import make_demo_flowers


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str]:
    root = tmp_path_factory.mktemp("reproduce")
    data = make_demo_flowers(root / "flowers", per_class=5)
    out = root / "out"
    # --epochs-scale 0.01 leaves one epoch a run; after `--`, flags for train.py.
    rc = reproduce.main(["--quick", "--out", str(out), "--data-path", str(data),
                         "--epochs-scale", "0.01", "--", "--workers", "0", "--batch-size", "8"])
    return root, out, rc, str(data)


def test_quick_writes_results_with_three_runs_and_a_plot(quick_run):
    _, out, rc, _ = quick_run
    assert rc == 0
    text = (out / "results.md").read_text()
    assert "synthetic and not comparable" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        run = cells[0]
        best = load(out / f"run{run}" / "weights" / "best.pth")["metrics"]["val_acc"]
        assert cells[4] == f"{100 * best:.1f}%"  # this run's number, read from best.pth
        assert cells[6] == {"1": "98.1%", "2": "97.8%", "3": "72.6%"}[run]
    assert "99.38" in text  # the paper's Table 5, Flowers-102, for context
    assert (out / "val_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_runs_are_the_report_runs(quick_run):
    _, out, _, data = quick_run
    pretrained = out / "pretrain" / "weights" / "best.pth"
    args = {run: load(out / f"run{run}" / "weights" / "best.pth")["args"] for run in "123"}
    assert args["1"]["weights"] == args["2"]["weights"] == str(pretrained)
    assert args["3"]["weights"] == ""
    assert [args[r]["freeze_layers"] for r in "123"] == [True, False, False]
    for run_args in args.values():
        assert run_args["data_path"] == data and run_args["model_name"] == "vit_demo_patch8_64"
        assert run_args["epochs"] == 1 and run_args["workers"] == 0  # passed through `--`
        assert run_args["batch_size"] == 8  # after `--`, train.py's flags win
    # Run 1 trained only the head: the backbone is the pretrained one, bit for bit.
    start, frozen = load(pretrained)["model"], load(out / "run1" / "weights" / "best.pth")["model"]
    backbone = [key for key in start if not key.startswith(("head.", "pre_logits."))]
    assert len(backbone) > 20 and set(backbone) <= set(frozen)
    for key in backbone:
        assert torch.equal(frozen[key], start[key]), key
    assert not torch.equal(frozen["head.weight"], start["head.weight"])


def test_finished_runs_are_skipped_and_unfinished_ones_trained(quick_run, capsys):
    _, out, _, data = quick_run
    before = (out / "run2" / "weights" / "best.pth").stat().st_mtime_ns
    # As if run 3 had been interrupted in its first epoch: only interrupted.pth is left.
    weights_dir = out / "run3" / "weights"
    for name in ("model-0.pth", "best.pth"):
        (weights_dir / name).unlink()
    save_checkpoint(Checkpoint(model={}, model_args={}, epoch=-1, interrupted_in_epoch=0),
                    weights_dir / "interrupted.pth")
    rc = reproduce.main(["--quick", "--out", str(out), "--data-path", data,
                         "--epochs-scale", "0.01", "--", "--workers", "0", "--batch-size", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 3 and "run 3: python train.py" in printed
    assert (out / "run2" / "weights" / "best.pth").stat().st_mtime_ns == before
    assert (out / "run3" / "weights" / "model-0.pth").is_file()
    assert len((out / "results.md").read_text().split("| 3 |")) == 2


def test_full_mode_without_weights_exits_2(quick_run, tmp_path, capsys):
    _, _, _, data = quick_run
    rc = reproduce.main(["--out", str(tmp_path / "out"), "--data-path", data,
                         "--weights", str(tmp_path / "in21k.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: Weights file") and "download.py" in err
    assert not (tmp_path / "out").exists()


def test_full_mode_with_a_file_as_data_path_says_it_is_a_file(tmp_path, capsys):
    data = tmp_path / "flower_photos.tgz"
    data.write_bytes(b"an archive, not yet extracted")
    rc = reproduce.main(["--out", str(tmp_path / "out"), "--data-path", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --data-path {data} is a file;"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-1", "1e308"])
def test_epochs_scale_must_be_a_positive_number(tmp_path, capsys, scale):
    # --data-path in tmp_path: a scale let through would write the demo data there, not in ./
    rc = reproduce.main(["--quick", "--out", str(tmp_path / "out"), "--data-path",
                         str(tmp_path / "flowers"), "--epochs-scale", scale])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --epochs-scale") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "flowers").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    in_the_way = tmp_path / "out"
    in_the_way.write_text("keep me")
    rc = reproduce.main(["--quick", "--out", str(in_the_way), "--data-path",
                         str(tmp_path / "flowers")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{in_the_way} is a file" in err and len(err.splitlines()) == 1
    assert in_the_way.read_text() == "keep me" and not (tmp_path / "flowers").exists()


# `--output` is argparse's abbreviation of --output-dir; `=` joins a flag to its value.
# {tmp} is the test's tmp_path: were a flag not refused, nothing is written elsewhere.
@pytest.mark.parametrize("words", [
    ["--output-dir", "{tmp}/zz2"], ["--output", "{tmp}/zz2"], ["--log-dir={tmp}/logs"],
    ["--data-path", "{tmp}/x"], ["--weights", ""], ["--resume", "auto"], ["--freeze-layers"],
    ["--no-freeze-layers"], ["--epochs", "2"], ["--demo"]], ids=" ".join)
def test_flags_set_for_each_run_are_refused_after_the_dashes(tmp_path, capsys, words):
    words = [word.format(tmp=tmp_path) for word in words]
    rc = reproduce.main(["--quick", "--out", str(tmp_path / "out"), "--data-path",
                         str(tmp_path / "flowers"), "--epochs-scale", "0.01", "--", *words])
    err = capsys.readouterr().err
    typed = words[0].split("=")[0]
    flag = {"--output": "--output-dir", "--no-freeze-layers": "--freeze-layers"}.get(typed, typed)
    assert rc == 2 and err.startswith(f"error: {flag} ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "flowers").exists()
    assert not (tmp_path / "zz2").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("quick", [False, True])
def test_every_flag_reproduce_sets_for_each_run_is_one_it_refuses_after_the_dashes(tmp_path,
                                                                                   quick):
    args = reproduce.get_args_parser().parse_args(["--quick"] if quick else [])
    args.data_path = "flowers"
    argvs = [reproduce.train_argv(run, args, tmp_path, "pretrained.pth")
             for run in reproduce.RUNS]
    if quick:
        argvs.append(reproduce.pretrain_argv(args, tmp_path))
    for argv in argvs:
        # --quick's model, device, batch and lr are the same for every run: `--` may change them
        set_here = train.given_options(argv) - set(train.given_options(
            reproduce.quick_settings()))
        assert set_here == set(reproduce.SET_FOR_EACH_RUN), argv


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_with_one_way_on(tmp_path, signum, status):
    data = make_demo_flowers(tmp_path / "flowers", per_class=5)
    # Four pretraining epochs in batches of 2: long enough to be interrupted inside.
    command = [sys.executable, str(ROOT / "reproduce.py"), "--quick", "--out",
               str(tmp_path / "out"), "--data-path", str(data), "--", "--workers", "0",
               "--batch-size", "2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Python's own Ctrl-C handling, however pytest was started
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first_epoch = tmp_path / "out" / "pretrain" / "weights" / "model-0.pth"
    deadline = time.monotonic() + 120
    while not first_epoch.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{first_epoch} never appeared"
        time.sleep(0.05)
    proc.send_signal(signum)  # SIGTERM: Slurm, docker stop; train.py saves as at Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "Interrupted; run the same reproduce.py command again to resume.", err
    # Not train.py's own advice (reproduce.py resumes its runs itself), and not a failure.
    assert "--resume auto" not in err and "error:" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("fault", ["a full disk", "a folder in the way of results.md's write"])
def test_a_failed_write_keeps_the_last_results_whole(quick_run, tmp_path, fault):
    # results.md and val_acc.png went straight to their names: a full disk left them empty.
    _, finished, _, data = quick_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)  # its runs are done: only the results are written again
    before = {name: (out / name).read_bytes() for name in ("results.md", "val_acc.png")}
    argv = ["--quick", "--out", str(out), "--data-path", data, "--epochs-scale", "0.01", "--",
            "--workers", "0", "--batch-size", "8"]
    if fault == "a full disk":
        failed = out / "val_acc.png"  # the first written
        with files_limited_to(0):
            code, _, err = run_cli(reproduce.main, argv)
    else:
        failed = out / "results.md"
        (out / ".results.md.tmp").mkdir()  # where its new text is written before the rename
        code, _, err = run_cli(reproduce.main, argv)
        (out / ".results.md.tmp").rmdir()
    line = one_error_line(code, err, status=1)
    assert line.startswith(f"error: Cannot write {failed} ("), line
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*.tmp"))
