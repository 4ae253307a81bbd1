"""The checkpoint format (checkpoints.py): its version, old files, atomic writes, a run's folder."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from write_faults import assert_only, files_limited_to

from checkpoints import (
    BEST_FILE,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointWriter,
    atomic_write_bytes,
    epoch_checkpoints,
    epoch_file,
    find_checkpoint,
    load_resumable,
    make_checkpoint,
    peek_checkpoint,
    prune_checkpoints,
    read_progress,
    read_train_args,
    remove_temporary_files,
    restore_training_state,
    save_checkpoint,
    training_state,
    write_atomically,
)
from errors import UserError, WeightsError, WriteError
from vit_model import VisionTransformer
from weights import read_weights

CLASSES = ["daisy", "roses", "tulips"]


def training_parts(model: VisionTransformer):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    return optimizer, scheduler


def test_an_epoch_checkpoint_round_trips_with_its_version(tmp_path):
    model = tiny_model(len(CLASSES))
    optimizer, scheduler = training_parts(model)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint = make_checkpoint(model, "vit_tiny", CLASSES, {"seed": 3, "val_rate": 0.2}, 4,
                                 {"val_acc": 0.75}, best_acc=0.8, log_dir="runs/x",
                                 samples={"train": 10, "val": 3},
                                 **training_state(optimizer, scheduler, None))
    save_checkpoint(checkpoint, tmp_path / "model-4.pth")

    raw = torch.load(tmp_path / "model-4.pth", weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 1
    assert "scaler" not in raw and "interrupted_in_epoch" not in raw  # no value, no key
    back = peek_checkpoint(tmp_path / "model-4.pth")
    assert (back.epoch, back.metrics, back.best_acc, back.samples) == (
        4, {"val_acc": 0.75}, 0.8, {"train": 10, "val": 3})
    assert back.class_names == CLASSES and back.model_name == "vit_tiny"
    assert back.model_args == model.model_args and back.resumable
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.model[name], tensor)
    assert read_progress(tmp_path / "model-4.pth") == (4, {"val_acc": 0.75})
    assert read_train_args(tmp_path / "model-4.pth") == {"seed": 3, "val_rate": 0.2}

    # The restored optimizer and schedule go on where the saved ones were.
    fresh = tiny_model(len(CLASSES))
    fresh.load_state_dict(back.model)
    fresh_optimizer, fresh_scheduler = training_parts(fresh)
    restore_training_state(load_resumable(tmp_path / "model-4.pth"), fresh_optimizer,
                           fresh_scheduler, None)
    assert fresh_scheduler.last_epoch == 1 and fresh_optimizer.param_groups[0]["lr"] == 0.05
    momentum = next(iter(fresh_optimizer.state.values()))["momentum_buffer"]
    assert torch.equal(momentum, next(iter(optimizer.state.values()))["momentum_buffer"])


def test_a_checkpoint_without_a_version_as_written_before_it_loads(tmp_path):
    model = tiny_model(len(CLASSES))
    optimizer, scheduler = training_parts(model)
    # The dict train.py wrote before the format had a version: every key, scaler None.
    old = {"model": model.state_dict(), "model_name": "vit_tiny",
           "model_args": model.model_args, "class_names": CLASSES, "epoch": 0,
           "metrics": {"val_acc": 0.5, "train_loss": 1.0}, "args": {"seed": 0},
           "best_acc": 0.5, "optimizer": optimizer.state_dict(),
           "lr_scheduler": scheduler.state_dict(), "scaler": None,
           "rng_states": {"torch": torch.get_rng_state(), "python": (3, (0,) * 625, None)},
           "log_dir": "runs/old", "samples": {"train": 8, "val": 2}}
    torch.save(old, tmp_path / "model-0.pth")

    checkpoint = load_resumable(tmp_path / "model-0.pth")
    assert checkpoint.epoch == 0 and checkpoint.scaler is None and checkpoint.log_dir == "runs/old"
    assert read_progress(tmp_path / "model-0.pth") == (0, old["metrics"])
    weights = read_weights(tmp_path / "model-0.pth")
    assert weights.format == "this project" and weights.class_names == CLASSES
    # Saved again, it gets the version and keeps every value.
    save_checkpoint(checkpoint, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again["format_version"] == FORMAT_VERSION
    assert {k: v for k, v in again.items() if k not in ("format_version", "model", "optimizer",
                                                        "lr_scheduler", "rng_states")} == {
        k: v for k, v in old.items() if k not in ("model", "optimizer", "lr_scheduler",
                                                  "rng_states", "scaler")}


def test_a_newer_format_and_files_that_are_no_checkpoint(tmp_path):
    model = tiny_model(len(CLASSES))
    newer = {"format_version": FORMAT_VERSION + 1, "model": model.state_dict(),
             "model_args": model.model_args}
    with pytest.raises(UserError, match="format version 2"):
        Checkpoint.from_dict(newer)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name in ("bare.pth", "text.pth", "missing.pth"):
        assert peek_checkpoint(tmp_path / name) is None
        assert read_progress(tmp_path / name) is None and read_train_args(tmp_path / name) == {}
    save_checkpoint(Checkpoint(model=model.state_dict(), model_args=model.model_args),
                    tmp_path / "weights-only.pth")
    with pytest.raises(UserError, match="no optimizer state"):
        load_resumable(tmp_path / "weights-only.pth")
    with pytest.raises(UserError, match="cannot be read"):
        load_resumable(tmp_path / "text.pth")


def test_a_damaged_pickle_inside_a_checkpoint_is_unreadable_not_a_crash(tmp_path):
    """The weights-only unpickler lets IndexError through for this one; every reader of a
    torch file turns it into its own answer."""
    import zipfile

    good, damaged = tmp_path / "good.pth", tmp_path / "model-0.pth"
    model = tiny_model(len(CLASSES))
    save_checkpoint(Checkpoint(model=model.state_dict(), model_args=model.model_args, epoch=0,
                               metrics={"val_acc": 0.5}), good)
    assert read_progress(good) == (0, {"val_acc": 0.5})
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(damaged, "w") as target:
        for member in source.infolist():
            data = source.read(member)
            # A SETITEM with no dict beneath its key and value: "list index out of range".
            target.writestr(member, b"\x80\x02K\x01K\x02s." if member.filename.endswith(
                "/data.pkl") else data)
    assert peek_checkpoint(damaged) is None and read_progress(damaged) is None
    with pytest.raises(UserError, match=r"cannot be read \(IndexError\)"):
        load_resumable(damaged)
    with pytest.raises(WeightsError, match="not a readable PyTorch file \\(IndexError\\)"):
        read_weights(damaged)


def test_a_failed_write_says_so_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "best.pth").mkdir()  # a folder where the file should go
    with pytest.raises(WriteError, match="Cannot write .*best.pth"):
        save_checkpoint({"w": torch.zeros(1)}, tmp_path / "best.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]


def test_a_runs_folder_newest_best_and_pruning(tmp_path):
    assert find_checkpoint(tmp_path) is None
    for epoch in (0, 2, 10):
        save_checkpoint({"epoch": epoch}, tmp_path / epoch_file(epoch))
    (tmp_path / "model-final.pth").write_bytes(b"")  # not an epoch checkpoint
    assert [epoch for epoch, _ in epoch_checkpoints(tmp_path)] == [0, 2, 10]  # by number
    assert find_checkpoint(tmp_path) == tmp_path / "model-10.pth"
    save_checkpoint({"epoch": 2}, tmp_path / BEST_FILE)
    assert find_checkpoint(tmp_path) == tmp_path / BEST_FILE
    prune_checkpoints(tmp_path, 1)
    assert [epoch for epoch, _ in epoch_checkpoints(tmp_path)] == [10]
    assert (tmp_path / BEST_FILE).is_file()


# --------------------------------------------------------------------------- atomic writes,
# tested deterministically: a writer that dies halfway, and the target watched while written

def test_a_checkpoint_write_that_dies_halfway_leaves_the_old_file_byte_identical(
        tmp_path, monkeypatch):
    target = tmp_path / "best.pth"
    save_checkpoint({"w": torch.zeros(3)}, target)
    old = target.read_bytes()
    real_save = torch.save
    watched = []

    def dies_halfway(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        watched.append(target.read_bytes() == old)  # mid-write, the target is untouched
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint({"w": torch.ones(1000)}, target)
    assert watched == [True]
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]  # no partial file left


def test_a_checkpoint_appears_at_its_path_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "model-0.pth"
    save_checkpoint({"w": torch.zeros(3)}, target)
    old = target.read_bytes()
    real_save = torch.save
    during = []

    def watching_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        during.append(target.read_bytes() == old)

    monkeypatch.setattr(torch, "save", watching_save)
    save_checkpoint({"w": torch.ones(1000)}, target)
    assert during == [True]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1000))


def test_a_small_file_write_that_dies_halfway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "class_indices.json"
    atomic_write_bytes(target, b'{"0": "daisy"}')
    real_write_bytes = Path.write_bytes

    def dies_halfway(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", dies_halfway)
    with pytest.raises(WriteError):
        atomic_write_bytes(target, b'{"0": "roses", "1": "tulips"}')
    monkeypatch.undo()
    assert target.read_bytes() == b'{"0": "daisy"}'
    assert [p.name for p in tmp_path.iterdir()] == ["class_indices.json"]


def test_a_failed_cleanup_does_not_hide_the_write_error(tmp_path):
    """The folder is a file: neither the checkpoint nor its temporary file can be made."""
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(WriteError, match="Cannot write"):
        save_checkpoint({"w": torch.zeros(1)}, tmp_path / "file" / "model-0.pth")
    assert (tmp_path / "file").read_text() == "keep me"


# --------------------------------------------------------------------------- a real full disk
# (the kernel's file-size limit: every writer fails for real, nothing patched)

def test_write_atomically_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("the old results\n")

    def write(tmp: Path) -> None:
        with tmp.open("w") as f:
            f.write("the new results\n" * 1000)

    with files_limited_to(100), pytest.raises(WriteError) as caught:
        write_atomically(target, write)
    assert str(caught.value) == (f"Cannot write {target} (File too large); check the folder "
                                 f"and the free space.")
    assert target.read_text() == "the old results\n"
    assert_only(tmp_path, ["results.csv"])
    write_atomically(target, write)  # with room, the new file replaces the old
    assert target.read_text() == "the new results\n" * 1000
    assert_only(tmp_path, ["results.csv"])


def test_a_checkpoint_write_on_a_full_disk_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "best.pth"
    save_checkpoint({"w": torch.zeros(3)}, target)
    old = target.read_bytes()
    with files_limited_to(len(old)), pytest.raises(WriteError, match="best.pth"):
        save_checkpoint({"w": torch.ones(10_000)}, target)  # torch's own C++ writer
    assert target.read_bytes() == old
    assert_only(tmp_path, ["best.pth"])


def test_the_temporary_file_is_one_a_runs_cleanup_finds(tmp_path):
    # A kill midway leaves the temporary; train.py removes the run folder's .*.tmp files.
    seen = []
    write_atomically(tmp_path / "model-3.pth", lambda tmp: seen.append(tmp) or tmp.touch())
    assert seen[0].parent == tmp_path and seen[0].match(".*.tmp")
    seen[0].touch()
    assert remove_temporary_files(tmp_path) == [seen[0]]


def test_a_ctrl_c_while_waiting_for_the_writer_keeps_its_job_waited_for():
    # SIGTERM or Ctrl-C often comes while the last epoch's save is being waited for; the
    # interrupted.pth saved next must still wait for that save, not race it.
    writer = CheckpointWriter()
    release, done = threading.Event(), []

    def slow_save() -> None:
        release.wait(10)
        time.sleep(0.2)
        done.append(True)

    writer.run(slow_save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            writer.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    release.set()
    writer.wait()
    assert done == [True]
    writer.close()
