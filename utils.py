"""The split, the training and evaluation loops, and checkpoint I/O."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from my_dataset import check_image, is_image_file

IMG_SUFFIX_HINT = (".jpg", ".jpeg", ".png")


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit with status 2."""


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""


@dataclass
class Split:
    class_names: list[str]
    train_images: list[Path]
    train_labels: list[int]
    val_images: list[Path]
    val_labels: list[int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why) unreadable

    @property
    def num_images(self) -> int:
        return len(self.train_images) + len(self.val_images)


def find_classes(root: str | Path) -> list[str]:
    """The sorted sub-folders of root: one class each."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Data path {root} does not exist or is not a folder; pass --data-path "
                        f"(python download.py flowers fetches flower_photos).")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class folders; it must hold one sub-folder of images "
                        f"per class (flower_photos/daisy/*.jpg, ...).")
    return classes


def read_split_data(root: str | Path, val_rate: float = 0.2, seed: int = 0,
                    verify: bool = True, warn=print) -> Split:
    """Per class: files sorted, int(n * val_rate) drawn for validation with a seeded generator.

    Draws as the reproduced repository does after random.seed(0) (one generator, classes in
    sorted order), so flower_photos splits into the report's 2939 / 731. Files that cannot be
    decoded are named through `warn`, skipped before the draw and listed in Split.skipped.
    """
    if not 0.0 <= val_rate < 1.0:
        raise UserError(f"--val-rate must be in [0, 1), got {val_rate}.")
    root = Path(root)
    class_names = find_classes(root)
    per_class = {name: sorted(p for p in (root / name).iterdir()
                              if p.is_file() and is_image_file(p))
                 for name in class_names}
    skipped: list[tuple[Path, str]] = []
    if verify:
        files = [p for paths in per_class.values() for p in paths]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = dict(zip(files, pool.map(check_image, files), strict=True))
        for path, why in problems.items():
            if why is not None:
                warn(f"warning: skipping {path}: cannot be read as an image ({why}).")
                skipped.append((path, why))
        per_class = {name: [p for p in paths if problems[p] is None]
                     for name, paths in per_class.items()}
    if not any(per_class.values()):
        raise UserError(f"No readable images under {root}; expected files such as "
                        f"{root}/{class_names[0]}/image.jpg ({', '.join(IMG_SUFFIX_HINT)}).")

    rng = random.Random(seed)  # a generator of our own: the global RNG is left alone
    split = Split(class_names, [], [], [], [], skipped)
    for label, name in enumerate(class_names):
        images = per_class[name]
        val = set(rng.sample(images, k=int(len(images) * val_rate)))
        for path in images:
            if path in val:
                split.val_images.append(path)
                split.val_labels.append(label)
            else:
                split.train_images.append(path)
                split.train_labels.append(label)
    return split


def write_class_indices(class_names: list[str], path: str | Path) -> None:
    """{"0": "daisy", ...}, the reproduced repository's class_indices.json."""
    text = json.dumps({str(i): name for i, name in enumerate(class_names)}, indent=4)
    atomic_write_bytes(Path(path), (text + "\n").encode())


def read_class_indices(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
        return [mapping[str(i)] for i in range(len(mapping))]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path} is not a readable class_indices.json ({err}).") from None


def select_device(name: str) -> torch.device:
    """The asked-for device; the CPU, with a notice, when CUDA or MPS is absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cuda:0, cpu or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"CUDA is not available; using the CPU instead of {name}.")
            return torch.device("cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s), numbered from 0.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        print("MPS is not available; using the CPU.")
        return torch.device("cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not supported; use cuda:N, cpu or mps.")
    return device



# --------------------------------------------------------------------------- loops

def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    data_loader, device: torch.device, epoch: int) -> dict[str, float]:
    """One pass over the training data; loss and accuracy averaged over samples."""
    model.train()
    loss_function = nn.CrossEntropyLoss()
    total_loss, total_correct, total_seen = 0.0, 0, 0
    bar = tqdm(data_loader, file=sys.stdout, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss = loss_function(logits, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"The loss became {loss.item()} at epoch {epoch}, step "
                                     f"{step}; training stopped (lower --lr?). The last good "
                                     f"checkpoint is kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        batch = labels.shape[0]
        total_loss += loss.item() * batch
        total_correct += (logits.argmax(dim=1) == labels).sum().item()
        total_seen += batch
        bar.desc = (f"[train epoch {epoch}] loss: {total_loss / total_seen:.3f}, "
                    f"acc: {total_correct / total_seen:.3f}")
    return {"loss": total_loss / max(total_seen, 1), "acc": total_correct / max(total_seen, 1),
            "samples": total_seen}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, epoch: int) -> dict[str, float]:
    """Loss and accuracy over the validation set, averaged over samples (not batches)."""
    model.eval()
    loss_function = nn.CrossEntropyLoss(reduction="sum")
    total_loss, total_correct, total_seen = 0.0, 0, 0
    bar = tqdm(data_loader, file=sys.stdout, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += loss_function(logits, labels).item()
        total_correct += (logits.argmax(dim=1) == labels).sum().item()
        total_seen += labels.shape[0]
        bar.desc = (f"[valid epoch {epoch}] loss: {total_loss / total_seen:.3f}, "
                    f"acc: {total_correct / total_seen:.3f}")
    return {"loss": total_loss / max(total_seen, 1), "acc": total_correct / max(total_seen, 1),
            "samples": total_seen}


def cosine_lambda(epochs: int, lrf: float):
    """The report's schedule, a factor on lr: from 1 at epoch 0 down to lrf at the end."""
    return lambda epoch: ((1 + math.cos(epoch * math.pi / epochs)) / 2) * (1 - lrf) + lrf


# --------------------------------------------------------------------------- checkpoints

def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def find_checkpoint(folder: str | Path) -> Path | None:
    """best.pth in folder, else the newest model-*.pth by epoch number, else None."""
    folder = Path(folder)
    if (folder / "best.pth").is_file():
        return folder / "best.pth"
    epochs = []
    for path in folder.glob("model-*.pth"):
        try:
            epochs.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return max(epochs)[1] if epochs else None
