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
import pickle
import random
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from errors import UserError
from errors import write_error as _write_error

# Version 1: the keys of Checkpoint below. Raise it when a key changes meaning or goes away,
# and teach from_dict to read the older versions.
FORMAT_VERSION = 1

# The files a training run writes into its output folder.
BEST_FILE = "best.pth"                    # the epoch with the highest validation accuracy
INTERRUPTED_FILE = "interrupted.pth"      # the weights at Ctrl-C; no optimizer state
CLASS_INDICES_FILE = "class_indices.json"  # {"0": "daisy", ...}, as the reproduced repository
_EPOCH_PREFIX, _SUFFIX = "model-", ".pth"


def epoch_file(epoch: int) -> str:
    """model-{epoch}.pth: the checkpoint after epoch `epoch` (counted from 0)."""
    return f"{_EPOCH_PREFIX}{epoch}{_SUFFIX}"


@dataclass
class Checkpoint:
    """One checkpoint file's content; None (or empty) where a kind of checkpoint has no value.

    Every checkpoint has model and model_args. train.py's epoch checkpoints have all the
    rest but source_format; its interrupted.pth has no training state (optimizer ... samples)
    and metrics {}; convert.py's have model, model_args, model_name, class_names and
    source_format.
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
    log_dir: str | None = None          # the TensorBoard run folder; a resumed run goes on in it
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

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        # A cleanup that fails too (the folder is gone or is a file) must not hide the error.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_checkpoint(checkpoint: Checkpoint | dict, path: str | Path) -> None:
    """torch.save atomically; a Checkpoint as its dict, any other dict (a bare state dict) as is."""
    path = Path(path)
    obj = checkpoint.to_dict() if isinstance(checkpoint, Checkpoint) else checkpoint
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        # A cleanup that fails too (the folder is gone or is a file) must not hide the error.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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

    def save(self, checkpoint: Checkpoint | dict, paths: list[Path],
             after: Callable[[], None] | None = None) -> None:
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

        self._pending.append(self._pool.submit(write))

    def run(self, work: Callable[[], object]) -> None:
        """Any other slow output (a TensorBoard figure), on the same thread, in order."""
        self._pending.append(self._pool.submit(work))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write here, in the training thread

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


# --------------------------------------------------------------------------- reading

_NOT_A_TORCH_FILE = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
                     zipfile.BadZipFile)


def peek_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint in a file, or None for a file that is not one (or cannot be read).

    mmap reads only the pickled header and maps the tensors without reading them, so
    looking at a ViT-B checkpoint's epoch, metrics or args is cheap.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _NOT_A_TORCH_FILE:
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


def load_resumable(path: Path) -> Checkpoint:
    """An epoch checkpoint to continue training from, read whole onto the CPU."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or not a checkpoint at all
        raise UserError(f"--resume {path} cannot be read ({type(err).__name__}); pick an "
                        f"earlier {_EPOCH_PREFIX}*{_SUFFIX}.") from None
    checkpoint = Checkpoint.from_dict(obj) if is_project_checkpoint(obj) else None
    if checkpoint is None or not checkpoint.resumable:
        raise UserError(f"{path} is not an epoch checkpoint of train.py (it has no optimizer "
                        f"state); use it as --weights to fine-tune from it instead.")
    return checkpoint


# --------------------------------------------------------------------------- a run's folder

def epoch_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every model-{epoch}.pth in folder, oldest first."""
    found = []
    for path in Path(folder).glob(f"{_EPOCH_PREFIX}*{_SUFFIX}"):
        try:
            found.append((int(path.stem.removeprefix(_EPOCH_PREFIX)), path))
        except ValueError:
            continue
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


def prune_checkpoints(folder: str | Path, keep: int | None) -> None:
    """Delete all but the newest `keep` epoch checkpoints; best.pth is never touched."""
    if keep is None:
        return
    found = epoch_checkpoints(folder)
    for _, path in found[:-keep] if keep > 0 else found:
        path.unlink(missing_ok=True)


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
    optimizer.load_state_dict(checkpoint.optimizer)
    scheduler.load_state_dict(checkpoint.lr_scheduler)
    if scaler is not None and checkpoint.scaler:
        scaler.load_state_dict(checkpoint.scaler)
    set_rng_states(checkpoint.rng_states)
