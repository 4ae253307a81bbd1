"""The checkpoint format: what train.py and convert.py write and every other script reads.

A checkpoint is a dict saved with torch.save and read with torch.load(weights_only=True):
only tensors, numbers, strings and containers of them, so loading one runs no code.
Checkpoint below names every key and what it means; it is the only place the dict is
built (Checkpoint.to_dict) and taken apart (Checkpoint.from_dict), so a reader asks this
module, never the dict. Files written before the format had a version (they have no
"format_version" key) are version 1 and load unchanged.

Also here: the file names of a run's folder, atomic writes, the background writer that
saves while the next epoch trains, finding and pruning epoch checkpoints, and the state a
resumed run restores (optimizer, scheduler, gradient scaler, random number generators).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from errors import UserError, writing
from errors import write_error as _write_error

T = TypeVar("T")

# Version 1: the keys of Checkpoint below. Raise it when a key changes meaning or goes away,
# and teach from_dict to read the older versions.
FORMAT_VERSION = 1

# train.py's --output-dir, where predict.py and evaluate.py look for weights by default.
DEFAULT_OUTPUT_DIR = "weights"
# The files a training run writes into its output folder.
BEST_FILE = "best.pth"                    # the epoch with the highest validation accuracy
# The weights at Ctrl-C, no optimizer state; deleted once the run writes a newer epoch
# checkpoint or finishes, so it never outlives the run it was interrupted in.
INTERRUPTED_FILE = "interrupted.pth"
CLASS_INDICES_FILE = "class_indices.json"  # {"0": "daisy", ...}, as the reproduced repository
_EPOCH_PREFIX, _SUFFIX = "model-", ".pth"
EPOCH_FILES = f"{_EPOCH_PREFIX}*{_SUFFIX}"  # the glob of the epoch checkpoints, epoch_file(n)
LOCK_FILE = ".train.lock"               # held by the run writing into the folder


def epoch_file(epoch: int) -> str:
    """model-{epoch}.pth: the checkpoint after epoch `epoch` (counted from 0)."""
    return f"{_EPOCH_PREFIX}{epoch}{_SUFFIX}"


@dataclass
class Checkpoint:
    """One checkpoint file's content; None (or empty) where a kind of checkpoint has no value.

    Every checkpoint has model and model_args. train.py's epoch checkpoints have all the
    rest but interrupted_in_epoch and source_format, and scaler only when training in float16.
    Its interrupted.pth has model_name, class_names, epoch, args, interrupted_in_epoch and
    metrics {}: no best_acc and no training state (optimizer ... samples). convert.py's have
    model_name, class_names (when its source has them) and source_format.
    """

    # The plain model's state_dict: parameter names as vit_model.py's, no "module." or
    # "_orig_mod." prefix (the wrappers are never saved).
    model: dict[str, torch.Tensor]
    # VisionTransformer(**model_args) builds the model these weights belong to.
    model_args: dict
    model_name: str | None = None       # the factory's name, e.g. "vit_base_patch16_224_in21k"
    class_names: list[str] | None = None  # output index -> class folder name
    epoch: int | None = None            # the last epoch finished, counted from 0
    # Of that epoch: train_loss, train_acc, val_loss, val_acc, learning_rate (the rate used
    # during the epoch), images_per_sec (training phase), peak_gpu_memory_gb (CUDA only).
    metrics: dict[str, float] = field(default_factory=dict)
    args: dict = field(default_factory=dict)  # train.py's arguments, vars(args)
    best_acc: float | None = None       # the highest val_acc up to this epoch
    # The training state a resumed run restores (train.py --resume): state_dicts of the
    # optimizer, the LambdaLR scheduler and the float16 gradient scaler (None without one),
    # and the random number generators' states (rng_states()).
    optimizer: dict | None = None
    lr_scheduler: dict | None = None
    scaler: dict | None = None
    rng_states: dict | None = None
    # The TensorBoard run folder; a resumed run goes on in it (or, given another --log-dir,
    # in a folder of its name there).
    log_dir: str | None = None
    samples: dict[str, int] | None = None  # {"train": n, "val": n} images seen in the epoch
    interrupted_in_epoch: int | None = None  # interrupted.pth: the epoch Ctrl-C stopped
    source_format: str | None = None    # convert.py: the format the weights came from

    @property
    def resumable(self) -> bool:
        """An epoch checkpoint of train.py, which --resume can continue from."""
        return self.optimizer is not None

    def to_dict(self) -> dict:
        """The dict torch.save writes; keys without a value are left out."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format_version": FORMAT_VERSION,
                **{key: value for key, value in values.items() if value is not None}}

    @classmethod
    def from_dict(cls, obj: dict) -> Checkpoint:
        """The checkpoint in a dict that torch.load returned (is_project_checkpoint(obj))."""
        version = obj.get("format_version", 1)  # files of before the key: version 1
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"This checkpoint has format version {version!r}; this code reads "
                            f"versions up to {FORMAT_VERSION}: update the project.")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in obj.items()
                      if key in known and value is not None})


def is_project_checkpoint(obj: object) -> bool:
    """Whether a loaded object is a checkpoint of this project (not a bare state dict)."""
    return isinstance(obj, dict) and "model" in obj and "model_args" in obj


def make_checkpoint(model: nn.Module, model_name: str, class_names: list[str],
                    args: dict, epoch: int, metrics: dict, **state) -> Checkpoint:
    """The checkpoint of a training run: the plain (unwrapped) model, what rebuilds and uses
    it, and `state`, the other Checkpoint fields (training_state(), best_acc, ...)."""
    return Checkpoint(model=model.state_dict(), model_args=model.model_args,
                      model_name=model_name, class_names=class_names, epoch=epoch,
                      metrics=metrics, args=args, **state)


# --------------------------------------------------------------------------- writing

def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Write path whole or not at all: write(tmp) fills a temporary file beside it, which is
    then renamed to path. A failed write (a full disk) raises WriteError naming path and
    leaves the old file, if any, intact and no temporary behind; a kill midway leaves the
    old file intact too, and the temporary (remove_temporary_files clears a run's folder).

    The temporary is .{name}.tmp, so a library that picks the format by the suffix must be
    told it (matplotlib: savefig(tmp, format=...)), or write to memory (atomic_write_bytes).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's C++ writers report OS errors as these
        raise _write_error(path, err) from None
    finally:
        with contextlib.suppress(OSError):  # in a read-only folder: keep the first error
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically (write_atomically)."""
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically, in UTF-8 (write_atomically)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(checkpoint: Checkpoint | dict, path: str | Path) -> None:
    """torch.save atomically; a Checkpoint as its dict, any other dict (a bare state dict) as is."""
    path = Path(path)
    obj = checkpoint.to_dict() if isinstance(checkpoint, Checkpoint) else checkpoint
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def _to_cpu_copy(obj, devices: set[torch.device]):
    """A deep copy with every tensor on the CPU, so training can go on while it is written.

    GPU tensors are copied asynchronously (into pinned memory, in stream order, so before
    the next step changes them); `devices` collects the GPUs to wait for before writing.
    """
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cuda":
            devices.add(obj.device)
            return obj.detach().to("cpu", non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v, devices) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu_copy(v, devices) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, each atomically.

    A ViT-B/16 checkpoint is 330 MB or more; writing it while the next epoch
    trains keeps the GPU busy. wait() blocks until everything queued is on disk.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = []
        self._last_save = None

    def save(self, checkpoint: Checkpoint | dict, paths: list[Path],
             after: Callable[[], None] | None = None) -> None:
        """Queue a write of checkpoint to each of paths, then after(); first raise the error
        of an earlier write that failed, so a run never trains on while nothing is saved."""
        self._raise_failures()
        devices: set[torch.device] = set()
        obj = checkpoint.to_dict() if isinstance(checkpoint, Checkpoint) else checkpoint
        snapshot = _to_cpu_copy(obj, devices)
        copied = []
        for device in devices:  # the writer waits for the copies, the training thread not
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            copied.append(event)

        def write() -> None:
            for event in copied:
                event.synchronize()
            for path in paths:
                save_checkpoint(snapshot, path)
            if after is not None:
                after()

        self._last_save = self._pool.submit(write)
        self._pending.append(self._last_save)

    def run(self, work: Callable[[], T]) -> Future[T]:
        """Any other slow output (a TensorBoard figure), on the same thread, in order."""
        future = self._pool.submit(work)
        self._pending.append(future)
        return future

    def _raise_failures(self) -> None:
        """Raise the error of a finished job, and of the previous save, finished or not: it
        has had a whole epoch to finish, so waiting for it costs nothing."""
        for future in [f for f in self._pending if f.done() or f is self._last_save]:
            self._collect(future)

    def wait(self) -> None:
        while self._pending:
            self._collect(self._pending[0])

    def _collect(self, future: Future) -> None:
        """Wait for a job and re-raise its error here, in the training thread. It leaves the
        queue only once it has ended: a Ctrl-C or SIGTERM while waiting keeps it there, so
        that saving interrupted.pth next still waits for it instead of racing it."""
        try:
            future.result()
        finally:
            if future.done():
                self._pending.remove(future)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


# --------------------------------------------------------------------------- reading

# What torch.load(weights_only=True) raises for a file that is no torch file, or a truncated
# or damaged one. Not a short list: besides OSError, RuntimeError (the zip reader) and
# pickle.UnpicklingError, the unpickler lets its own failures through, and flipping bytes of a
# checkpoint turned up IndexError, struct.error, UnicodeDecodeError and AssertionError. The
# callers wrap only torch.load, so the broad catch hides no error of ours.
UNREADABLE_TORCH_FILE = (Exception,)


def is_torchscript(names: list[str]) -> bool:
    """Whether a zip's member names are torch.jit.save's (export.py's output, which torch.load
    refuses): beside torch.save's data.pkl and data/, an archive/constants.pkl and the
    model's Python code under archive/code/."""
    inside = [name.partition("/")[2] for name in names]  # below the archive's one folder
    return "constants.pkl" in inside or any(name.startswith("code/") for name in inside)


def is_torchscript_file(path: str | Path) -> bool:
    return is_torchscript(zip_member_names(path))


def zip_member_names(path: str | Path) -> list[str]:
    """The names inside a zip archive; none for a file that is not a readable one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def peek_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint in a file, or None for a file that is not one (or cannot be read).

    mmap reads only the pickled header and maps the tensors without reading them, so
    looking at a ViT-B checkpoint's epoch, metrics or args is cheap.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UNREADABLE_TORCH_FILE:
        return None
    return Checkpoint.from_dict(obj) if is_project_checkpoint(obj) else None


def read_progress(path: str | Path) -> tuple[int, dict[str, float]] | None:
    """(epoch, metrics) of an epoch checkpoint, cheaply; None for a file without them."""
    checkpoint = peek_checkpoint(path)
    if checkpoint is None or checkpoint.epoch is None or not checkpoint.metrics:
        return None
    return checkpoint.epoch, checkpoint.metrics


def read_train_args(path: str | Path) -> dict:
    """The train.py arguments a checkpoint was trained with; {} for files without them."""
    checkpoint = peek_checkpoint(path)
    return dict(checkpoint.args) if checkpoint is not None else {}


def read_resumable(path: Path) -> tuple[Checkpoint | None, tuple[str, str]]:
    """(the epoch checkpoint in path, read whole onto the CPU to continue training from,
    ("", "")), or for a file that is none: (None, (why not, what to pass as --resume
    instead))."""
    if is_torchscript_file(path):  # which torch.load would refuse with a warning
        return None, ("is a TorchScript export, which holds no training state",
                      f"pass the run's newest {EPOCH_FILES}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE as err:  # a truncated file, or not a checkpoint at all
        return None, (f"cannot be read ({type(err).__name__})", f"pick an earlier {EPOCH_FILES}")
    checkpoint = Checkpoint.from_dict(obj) if is_project_checkpoint(obj) else None
    if checkpoint is None or not checkpoint.resumable:
        return None, ("is not an epoch checkpoint of train.py (it has no optimizer state)",
                      "use it as --weights to fine-tune from it instead")
    return checkpoint, ("", "")


def load_resumable(path: Path) -> Checkpoint:
    """The epoch checkpoint that --resume names; a UserError for a file that is none."""
    checkpoint, (why_not, instead) = read_resumable(path)
    if checkpoint is None:
        raise UserError(f"--resume {path} {why_not}; {instead}.")
    return checkpoint


# --------------------------------------------------------------------------- a run's folder

def epoch_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every model-{epoch}.pth file in folder, oldest first. (A folder of
    that name is none: paths_in_the_way finds it.)"""
    found = []
    for path in Path(folder).glob(EPOCH_FILES):
        try:
            epoch = int(path.stem.removeprefix(_EPOCH_PREFIX))
        except ValueError:
            continue
        if path.is_file():
            found.append((epoch, path))
    return sorted(found)


def newest_epoch_checkpoint(folder: str | Path) -> Path | None:
    found = epoch_checkpoints(folder)
    return found[-1][1] if found else None


def find_checkpoint(folder: str | Path) -> Path | None:
    """best.pth in folder, else the newest model-*.pth by epoch number, else None."""
    folder = Path(folder)
    if (folder / BEST_FILE).is_file():
        return folder / BEST_FILE
    return newest_epoch_checkpoint(folder)


def run_files(folder: str | Path) -> list[Path]:
    """The checkpoints a training run left in folder: best.pth, interrupted.pth, then the
    epoch checkpoints oldest first. (class_indices.json alone is no run: it holds no weights.)"""
    folder = Path(folder)
    named = [folder / name for name in (BEST_FILE, INTERRUPTED_FILE) if (folder / name).is_file()]
    return named + [path for _, path in epoch_checkpoints(folder)]


def paths_in_the_way(folder: str | Path) -> list[Path]:
    """What stands in folder where a training run writes a file but is no file (a folder
    named model-3.pth): found before the run starts, not when it fails to write there."""
    folder = Path(folder)
    fixed = [folder / name for name in (BEST_FILE, INTERRUPTED_FILE, CLASS_INDICES_FILE,
                                        LOCK_FILE)]
    written = [*fixed, *folder.glob(EPOCH_FILES), *folder.glob(".*.tmp")]  # .tmp: atomic writes
    return [path for path in written if path.exists() and not path.is_file()]


def unsaved_best(folder: str | Path) -> Path | None:
    """The epoch checkpoint whose weights best.pth should hold but does not, else None.

    The best epoch is the highest val_acc (ties: the earliest, as training picks it). best.pth
    lacks it when a run was killed between writing that epoch's checkpoint and best.pth, or
    when best.pth is damaged; best.pth is right when it is readable and scores at least as well
    as every epoch checkpoint (with --keep, its own epoch may be gone).
    """
    folder = Path(folder)
    scored = []
    for epoch, path in epoch_checkpoints(folder):
        progress = read_progress(path)
        if progress is not None and "val_acc" in progress[1]:
            scored.append((progress[1]["val_acc"], -epoch, path))
    if not scored:
        return None
    best_acc, _, source = max(scored)
    current = read_progress(folder / BEST_FILE)
    if current is not None and current[1].get("val_acc", -1.0) >= best_acc:
        return None
    return source


def prune_checkpoints(folder: str | Path, keep: int | None) -> None:
    """Delete all but the newest `keep` epoch checkpoints; best.pth is never touched.

    Nor is unsaved_best(folder): together with restore_best at the start of a resumed run,
    this keeps the invariant that the best weights so far are always on disk, in best.pth
    or in an epoch checkpoint (a run killed before best.pth was written, then resumed with
    --keep, would otherwise prune the only copy).
    """
    if keep is None:
        return
    found = epoch_checkpoints(folder)
    spared = unsaved_best(folder)
    for _, path in found[:-keep] if keep > 0 else found:
        if path != spared:
            with writing(path):
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def lock_run_folder(folder: str | Path) -> Iterator[None]:
    """Hold folder for one training run; a second run into it is refused with a UserError.

    An flock on an open file: the kernel releases it when the process ends, however it ends,
    so a crashed or killed run never leaves the folder locked. The file names the holder's pid
    and is removed when the run ends.
    """
    import fcntl  # POSIX only; imported here so that reading checkpoints works everywhere

    path = Path(folder) / LOCK_FILE
    while True:
        try:  # no O_TRUNC: the holder's pid stays readable until it is locked
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _write_error(path, err) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise UserError(f"{folder} is in use by another training run (pid {holder}); wait "
                            f"for it to finish or pass another --output-dir.") from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        os.close(descriptor)  # a run that just ended removed the file we locked: lock the new one
    try:
        try:  # unbuffered: a full disk fails here, once, not again when the file is closed
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise _write_error(path, err) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so no one locks a file that is going away
        os.close(descriptor)


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the .*.tmp files that writes killed midway left in folder; return them.

    Only safe while holding lock_run_folder(folder): then no write of ours is under way.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def restore_best(folder: str | Path) -> Path | None:
    """Copy unsaved_best(folder), if any, to best.pth; return it (None: best.pth was right)."""
    source = unsaved_best(folder)
    if source is not None:
        write_atomically(Path(folder) / BEST_FILE, lambda tmp: shutil.copyfile(source, tmp))
    return source


# --------------------------------------------------------------------------- resume state

def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):  # fewer GPUs than when saved
            torch.cuda.set_rng_state_all(states["cuda"])


def training_state(optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler | None) -> dict:
    """The Checkpoint fields that --resume restores with restore_training_state."""
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_states": rng_states()}


def restore_training_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           scaler: torch.amp.GradScaler | None) -> None:
    """Put optimizer, scheduler, scaler and the random generators back where they were."""
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError) as err:  # another optimizer, or other parameters training
        raise UserError(f"--resume: the checkpoint's optimizer state does not fit this run "
                        f"({err}); resume with the flags the run was trained with.") from None
    scheduler.load_state_dict(checkpoint.lr_scheduler)
    if scaler is not None and checkpoint.scaler:
        scaler.load_state_dict(checkpoint.scaler)
    set_rng_states(checkpoint.rng_states)
