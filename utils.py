"""What the reproduced repository's utils.py holds: the split, class indices, the device, the
training and evaluation loops and the learning-rate schedule.

Its train.py runs on these unchanged: read_split_data(root) unpacks and indexes as its four
lists, and train_one_epoch / evaluate called with its arguments (the device may be a string)
return what unpacks and indexes as (loss, acc).
This project's train.py passes more (precision, accumulation, ranks) and reads more of
EpochStats.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from checkpoints import atomic_write_text
from distributed import Distributed, all_reduce_sums
from errors import NonFiniteLossError, UserError

# The reproduced repository's grad_cam/utils.py names, so its main_vit.py runs on this module.
from grad_cam import GradCAM, center_crop_img, show_cam_on_image  # noqa: F401
from my_dataset import IMG_EXTENSIONS_HINT, check_image, is_image_file

# The reproduced split: random.seed(0), a fifth of each class for validation.
DEFAULT_VAL_RATE = 0.2
DEFAULT_SEED = 0
# Seeds are below this. torch.manual_seed takes up to 2**64 - 1, but train.py's sampler seeds
# its generator with seed * 100_003 + epoch, which must stay below 2**64 too; a 32-bit seed
# leaves room to spare (and is what NumPy's legacy seeding takes).
SEED_LIMIT = 2**32


def seed_problem(seed: int | None) -> str | None:
    """--seed's range check, the same in every command that splits the data."""
    if seed is None or 0 <= seed < SEED_LIMIT:
        return None
    return f"--seed must be in [0, 2**32), got {seed}."


class _ReturnedAsTuple:
    """Unpacks, indexes and counts as the tuple the reproduced repository's function
    returned (what _as_tuple gives), so its scripts' `result[1]` works as theirs did."""

    def _as_tuple(self) -> tuple:
        raise NotImplementedError

    def __iter__(self) -> Iterator:
        return iter(self._as_tuple())

    def __getitem__(self, index: int | slice):
        return self._as_tuple()[index]

    def __len__(self) -> int:
        return len(self._as_tuple())


@dataclass
class Split(_ReturnedAsTuple):
    class_names: list[str]
    train_images: list[Path]
    train_labels: list[int]
    val_images: list[Path]
    val_labels: list[int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why) unreadable

    @property
    def num_images(self) -> int:
        return len(self.train_images) + len(self.val_images)

    def _as_tuple(self) -> tuple[list[str], list[int], list[str], list[int]]:
        """train_images_path, train_images_label, val_images_path, val_images_label =
        read_split_data(root), as the reproduced repository's four lists (of str paths)."""
        return ([str(p) for p in self.train_images], self.train_labels,
                [str(p) for p in self.val_images], self.val_labels)


def find_classes(root: str | Path) -> list[str]:
    """The sorted sub-folders of root: one class each."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Data path {root} does not exist or is not a folder; pass --data-path "
                        f"(python download.py flowers fetches flower_photos).")
    classes = sorted(p.name for p in list_folder(root)
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class folders; it must hold one sub-folder of images "
                        f"per class (flower_photos/daisy/*.jpg, ...).")
    return classes


def list_folder(folder: Path) -> list[Path]:
    """What folder holds; a folder that cannot be listed (permissions) is a UserError."""
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise UserError(f"Cannot read the folder {folder} ({err.strerror or err}); check its "
                        f"permissions.") from None


def read_split_data(root: str | Path, val_rate: float = DEFAULT_VAL_RATE, seed: int = DEFAULT_SEED,
                    verify: bool = True, warn=print) -> Split:
    """Per class: files sorted, int(n * val_rate) drawn for validation with a seeded generator.

    Draws as the reproduced repository does after random.seed(0) (one generator, classes in
    sorted order), so flower_photos splits into the report's 2939 / 731; it draws from
    os.listdir's order, which only some file systems sort, so the files can differ. Files
    that cannot be decoded are named through `warn`, skipped before the draw and listed in
    Split.skipped.
    """
    if not 0.0 <= val_rate < 1.0:
        raise UserError(f"--val-rate must be in [0, 1), got {val_rate}.")
    root = Path(root)
    class_names = find_classes(root)
    per_class = {name: sorted(p for p in list_folder(root / name)
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
                        f"{root}/{class_names[0]}/image.jpg ({IMG_EXTENSIONS_HINT}).")
    for label, name in enumerate(class_names):
        if not per_class[name]:  # still a class, numbered as the reproduced code numbers it
            warn(f"warning: {root / name} has no readable images; class {label} ({name}) "
                 f"gets none to train or validate on.")

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
    atomic_write_text(Path(path), text + "\n")


def read_class_indices(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable class_indices.json ({err}).") from None
    expected = 'a JSON object {"0": "daisy", "1": "dandelion", ...}'
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{path} holds {type(mapping).__name__} {str(mapping)[:40]}, not "
                        f"{expected}.")
    names = [mapping.get(str(i)) for i in range(len(mapping))]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            found = "no key" if name is None else f"{name!r}"
            raise UserError(f"{path} has {found} for class \"{i}\"; it must be {expected}, "
                            f"numbered from 0 without gaps, each a class name.")
    return names


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

@dataclass
class StepSettings:
    """How one optimisation step runs: precision, accumulation, clipping, loss."""

    amp_dtype: torch.dtype | None = None  # None: full float32
    scaler: torch.amp.GradScaler | None = None  # only for float16
    accum_steps: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0


def autocast(device_type: str, amp_dtype: torch.dtype | None, **kwargs) -> torch.autocast:
    """The run's precision: autocast to amp_dtype, or full float32 when it is None."""
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                          enabled=amp_dtype is not None, **kwargs)


@dataclass
class EpochStats(_ReturnedAsTuple):
    """One pass over a data set, averaged over samples; unpacks and indexes as (loss, acc),
    the reproduced repository's return value."""

    loss: float
    acc: float
    samples: int  # over all ranks
    images_per_sec: float | None = None  # training: the whole epoch's speed over all ranks
    confusion: torch.Tensor | None = None  # evaluation with num_classes: counts[true, predicted]

    def _as_tuple(self) -> tuple[float, float]:
        return self.loss, self.acc


def _bar(data_loader: Iterable, show: bool) -> tqdm:
    return tqdm(data_loader, file=sys.stdout, dynamic_ncols=True, disable=not show)


def _optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                    settings: StepSettings) -> None:
    """Clip (after unscaling) and step, through the gradient scaler when there is one."""
    if settings.clip_grad:
        if settings.scaler is not None:
            settings.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
    if settings.scaler is not None:
        settings.scaler.step(optimizer)
        settings.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                    device: torch.device, epoch: int, settings: StepSettings | None = None,
                    dist_info: Distributed | None = None) -> EpochStats:
    """One pass over the training data; loss and accuracy averaged over samples."""
    device = torch.device(device)  # the reproduced scripts may pass "cuda:0"
    settings = settings or StepSettings()
    dist_info = dist_info or Distributed()
    model.train()
    loss_function = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Sums stay on the device: a .item() per step would stall the GPU queue.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    total_seen = 0
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    start = time.perf_counter()
    bar = _bar(data_loader, dist_info.is_main)
    optimizer.zero_grad(set_to_none=True)
    steps = len(data_loader)
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device.type, settings.amp_dtype):
            logits = model(images)
            loss = loss_function(logits.float(), labels)
        scaled = loss / settings.accum_steps
        if settings.scaler is not None:
            scaled = settings.scaler.scale(scaled)
        scaled.backward()
        if (step + 1) % settings.accum_steps == 0 or step + 1 == steps:
            _optimizer_step(optimizer, params, settings)

        # Recorded on the device, read every 20 steps: the exact step, without a sync per step.
        bad = (~torch.isfinite(loss.detach())) & (first_bad_step < 0)
        first_bad_step = torch.where(bad, step, first_bad_step)
        batch = labels.shape[0]
        total_loss += loss.detach().double() * batch
        total_correct += (logits.argmax(dim=1) == labels).sum()
        total_seen += batch
        # Checking (and printing) every step would synchronise with the GPU each time.
        if step % 20 == 0 or step + 1 == steps:
            if first_bad_step.item() >= 0:
                raise NonFiniteLossError(
                    f"The loss became NaN or infinite at epoch {epoch}, step "
                    f"{first_bad_step.item()}; training stopped (lower --lr?). The last good "
                    f"checkpoint is kept.")
            rate = total_seen * dist_info.world_size / (time.perf_counter() - start)
            bar.desc = (f"[train epoch {epoch}] loss: {total_loss.item() / total_seen:.3f}, "
                        f"acc: {total_correct.item() / total_seen:.3f}")
            bar.set_postfix_str(f"{rate:.0f} img/s", refresh=False)
    loss_sum, correct, seen = all_reduce_sums(
        [total_loss.item(), float(total_correct.item()), float(total_seen)], device, dist_info)
    elapsed = time.perf_counter() - start
    return EpochStats(loss_sum / max(seen, 1), correct / max(seen, 1), int(seen),
                      images_per_sec=seen / max(elapsed, 1e-9))


def _validate(batches: Iterable,
              logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              device: torch.device, epoch: int, amp_dtype: torch.dtype | None,
              dist_info: Distributed | None, num_classes: int | None) -> EpochStats:
    """Loss, accuracy (and with num_classes the confusion counts) of logits_of(inputs) over
    (inputs, labels) batches, summed over samples and ranks."""
    device = torch.device(device)  # the reproduced scripts may pass "cuda:0"
    dist_info = dist_info or Distributed()
    loss_function = nn.CrossEntropyLoss(reduction="sum")
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    total_seen = 0
    confusion = torch.zeros(((num_classes or 1) ** 2,), dtype=torch.int64, device=device)
    bar = _bar(batches, dist_info.is_main)
    for step, (inputs, labels) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device.type, amp_dtype):
            logits = logits_of(inputs, labels)
        total_loss += loss_function(logits.float(), labels).double()
        preds = logits.argmax(dim=1)
        total_correct += (preds == labels).sum()
        total_seen += labels.shape[0]
        if num_classes:
            confusion += torch.bincount(labels * num_classes + preds,
                                        minlength=num_classes ** 2)
        if step % 20 == 0 or step + 1 == len(batches):
            bar.desc = (f"[valid epoch {epoch}] loss: {total_loss.item() / total_seen:.3f}, "
                        f"acc: {total_correct.item() / total_seen:.3f}")
    loss_sum, correct, seen = all_reduce_sums(
        [total_loss.item(), float(total_correct.item()), float(total_seen)], device, dist_info)
    stats = EpochStats(loss_sum / max(seen, 1), correct / max(seen, 1), int(seen))
    if num_classes:
        counts = all_reduce_sums(confusion.tolist(), device, dist_info)
        stats.confusion = torch.tensor(counts, dtype=torch.int64).reshape(num_classes, -1)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, epoch: int,
             amp_dtype: torch.dtype | None = None, dist_info: Distributed | None = None,
             num_classes: int | None = None) -> EpochStats:
    """Loss and accuracy over the validation set, averaged over samples (not batches).
    With num_classes, also the confusion counts."""
    model.eval()
    return _validate(data_loader, lambda images, labels: model(images), device, epoch,
                     amp_dtype, dist_info, num_classes)


def class_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a frozen backbone hands the head: the final LayerNorm's class token, (B, D)."""
    return model.forward_features(images)[:, 0]


def head_of(model: nn.Module) -> nn.Module:
    """The part that trains under --freeze-layers, class token -> logits: pre-logits, head.
    Shares the model's parameters."""
    return nn.Sequential(model.pre_logits, model.head)


class FeatureCache:
    """Validation of a model whose backbone does not train (--freeze-layers).

    The class-token features of the validation images stay the same from epoch to epoch:
    the first evaluation computes and keeps them, later ones run only the pre-logits and
    the head on them. Same numbers as evaluate(), a fraction of the time.
    """

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # on the device

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data_loader, device: torch.device, epoch: int,
                 amp_dtype: torch.dtype | None = None, dist_info: Distributed | None = None,
                 num_classes: int | None = None) -> EpochStats:
        """evaluate() of the plain VisionTransformer, from the kept features when there are."""
        model.eval()
        head = head_of(model)
        if self.batches is not None:
            return _validate(self.batches, lambda tokens, labels: head(tokens), device, epoch,
                             amp_dtype, dist_info, num_classes)
        computed = []

        def features_then_head(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            tokens = class_tokens(model, images)
            computed.append((tokens, labels))
            return head(tokens)

        stats = _validate(data_loader, features_then_head, device, epoch, amp_dtype,
                          dist_info, num_classes)
        self.batches = computed
        return stats


def lr_lambda(epochs: int, lrf: float, warmup_epochs: int = 0):
    """The report's cosine schedule as a factor on lr, 1 at the first epoch down towards lrf;
    with warmup, a linear ramp over the first epochs, then the cosine over the rest."""
    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        return ((1 + math.cos(t * math.pi)) / 2) * (1 - lrf) + lrf
    return factor
