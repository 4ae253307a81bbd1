"""The split, the training and evaluation loops, and checkpoint I/O."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from errors import NonFiniteLossError, UserError
from my_dataset import IMG_EXTENSIONS_HINT, check_image, is_image_file


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
                        f"{root}/{class_names[0]}/image.jpg ({IMG_EXTENSIONS_HINT}).")

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



# --------------------------------------------------------------------------- distributed

@dataclass
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun (RANK and WORLD_SIZE are set)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Distributed()
    import torch.distributed as dist

    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                            int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info


def all_reduce_sums(values: list[float], device: torch.device, dist_info: Distributed
                    ) -> list[float]:
    """Sum per-rank totals (loss sums, correct counts, samples) over all ranks."""
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    reduce_device = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class ShardSampler(torch.utils.data.Sampler):
    """Every sample once per epoch, this rank's share; reshuffled from seed + epoch.

    Unlike DistributedSampler it never pads with repeated samples, so the sample
    counts (and validation metrics) equal a one-process run's; DDP's join()
    absorbs the one-batch difference between ranks that this can leave.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0,
                 dist_info: Distributed | None = None) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.dist_info = dist_info or Distributed()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.dist_info.rank::self.dist_info.world_size]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(range(self.dist_info.rank, self.num_samples, self.dist_info.world_size))


# --------------------------------------------------------------------------- loops

@dataclass
class StepSettings:
    """How one optimisation step runs: precision, accumulation, clipping, loss."""

    amp_dtype: torch.dtype | None = None  # None: full float32
    scaler: torch.amp.GradScaler | None = None  # only for float16
    accum_steps: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0


class _Forward(nn.Module):
    """A module whose forward is the wrapped model's: make_graphed_callables replaces this
    forward, and the model's own stays eager for the batches the graph cannot take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class CudaGraphModel(nn.Module):
    """Runs training steps as replayed CUDA graphs of one captured batch shape.

    At small batches an eager ViT-B/16 step is bound by launching its ~830 kernels from
    Python, not by the GPU (BENCHMARKS.md: 24.8 ms eager, 14.3 ms replayed at batch 32).
    The first training batch's forward and backward are captured once with
    torch.cuda.make_graphed_callables; later batches replay the graphs. A shorter last
    batch is padded with zero images to the captured size and its extra logits dropped:
    samples never interact in a ViT (no batch norm), so the padding changes no loss and no
    gradient, and no second set of activations is needed beside the graph's. Evaluation
    and no-grad calls run the model eagerly on the same parameters. The loss, clipping and
    optimiser step stay eager, so accumulation, gradient scaling and the learning-rate
    schedule work unchanged.

    If capturing fails, a note is printed once and training goes on eagerly.

    Gradient accumulation (accumulate=True) needs one more step: a replayed backward hands
    out gradients that live in the graph's memory, and autograd keeps such a tensor as
    .grad when .grad is None, so the next replay would overwrite the first micro-batch's
    gradients. Giving every .grad its own zeros before a replay makes autograd add instead.
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None,
                 accumulate: bool = False, capture=None, log=print) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.accumulate = accumulate
        # Injectable so that the routing can be tested where CUDA is absent.
        self.capture = capture or torch.cuda.make_graphed_callables
        self.log = log
        self.graphed: nn.Module | None = None
        self.batch_shape: torch.Size | None = None
        self.failed = False

    def _capture(self, images: torch.Tensor) -> None:
        forward = _Forward(self.model).train()
        sample = torch.zeros_like(images)  # only shape, dtype and device matter
        try:
            # Autocast's weight cache would keep casts from the capture alive across replays.
            with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None, cache_enabled=False), \
                    warnings.catch_warnings():
                # make_graphed_callables warms up and captures on a stream of its own; torch
                # >= 2.10 warns there that gradients cross streams and that cuBLAS found no
                # context on the backward thread. Both are expected and harmless here.
                for message in ("The AccumulateGrad node's stream", "Attempting to run cuBLAS"):
                    warnings.filterwarnings("ignore", category=UserWarning, message=message)
                self.graphed = self.capture(forward, (sample,))
            self.batch_shape = images.shape
        except Exception as err:  # a model or torch build the graphs cannot take
            self.failed = True
            self.log(f"note: CUDA graphs could not be captured ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}); training eagerly.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or self.failed:
            return self.model(images)
        if self.graphed is None:
            self._capture(images)
        if (self.graphed is None or images.shape[1:] != self.batch_shape[1:]
                or len(images) > self.batch_shape[0]):
            return self.model(images)
        if self.accumulate:
            for param in self.model.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
        count = len(images)
        if count < self.batch_shape[0]:
            padding = images.new_zeros((self.batch_shape[0] - count, *images.shape[1:]))
            images = torch.cat([images, padding])
        return self.graphed(images)[:count]


def _bar(data_loader, show: bool):
    return tqdm(data_loader, file=sys.stdout, dynamic_ncols=True, disable=not show)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                    device: torch.device, epoch: int, settings: StepSettings | None = None,
                    dist_info: Distributed | None = None) -> dict[str, float]:
    """One pass over the training data; loss and accuracy averaged over samples."""
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
        with torch.autocast(device.type, dtype=settings.amp_dtype or torch.float32,
                            enabled=settings.amp_dtype is not None):
            logits = model(images)
            loss = loss_function(logits.float(), labels)
        update = (step + 1) % settings.accum_steps == 0 or step + 1 == steps
        scaled = loss / settings.accum_steps
        if settings.scaler is not None:
            scaled = settings.scaler.scale(scaled)
        scaled.backward()
        if update:
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
            mean_loss = total_loss.item() / total_seen
            rate = total_seen * dist_info.world_size / (time.perf_counter() - start)
            bar.desc = (f"[train epoch {epoch}] loss: {mean_loss:.3f}, "
                        f"acc: {total_correct.item() / total_seen:.3f}")
            bar.set_postfix_str(f"{rate:.0f} img/s", refresh=False)
    loss_sum, correct, seen = all_reduce_sums(
        [total_loss.item(), float(total_correct.item()), float(total_seen)], device, dist_info)
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1),
            "samples": int(seen), "images_per_sec": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, epoch: int,
             amp_dtype: torch.dtype | None = None, dist_info: Distributed | None = None,
             features_cache: dict | None = None, num_classes: int | None = None) -> dict:
    """Loss and accuracy over the validation set, averaged over samples (not batches).

    With features_cache (a dict, for a frozen backbone), the class-token features are
    computed on the first call and only the head runs on later ones: same numbers, a
    fraction of the time. With num_classes, also returns "confusion": counts[true, predicted].
    """
    dist_info = dist_info or Distributed()
    model.eval()
    loss_function = nn.CrossEntropyLoss(reduction="sum")
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    total_seen = 0
    core = getattr(model, "module", model)  # under DDP the head lives on .module
    core = getattr(core, "_orig_mod", core)  # and under torch.compile on ._orig_mod
    cached = features_cache is not None and "features" in features_cache
    batches = (list(zip(features_cache["features"], features_cache["labels"], strict=True))
               if cached else data_loader)
    new_features, new_labels = [], []
    confusion = torch.zeros(((num_classes or 1) ** 2,), dtype=torch.int64, device=device)
    bar = _bar(batches, dist_info.is_main)
    for step, (inputs, labels) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            if cached:
                logits = core.head(core.pre_logits(inputs))
            elif features_cache is not None:
                tokens = core.forward_features(inputs)[:, 0]
                new_features.append(tokens)
                new_labels.append(labels)
                logits = core.head(core.pre_logits(tokens))
            else:
                logits = model(inputs)
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
    if features_cache is not None and not cached:
        features_cache.update(features=new_features, labels=new_labels)
    loss_sum, correct, seen = all_reduce_sums(
        [total_loss.item(), float(total_correct.item()), float(total_seen)], device, dist_info)
    stats = {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "samples": int(seen)}
    if num_classes:
        counts = all_reduce_sums(confusion.tolist(), device, dist_info)
        stats["confusion"] = torch.tensor(counts, dtype=torch.int64).reshape(num_classes, -1)
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


def epoch_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every model-{epoch}.pth in folder, oldest first."""
    found = []
    for path in Path(folder).glob("model-*.pth"):
        try:
            found.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(found)


def prune_checkpoints(folder: str | Path, keep: int | None) -> None:
    """Delete all but the newest `keep` epoch checkpoints; best.pth is never touched."""
    if keep is None:
        return
    for _, path in epoch_checkpoints(folder)[:-keep] if keep > 0 else epoch_checkpoints(folder):
        path.unlink(missing_ok=True)


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

    def save(self, checkpoint: dict, paths: list[Path], after=None) -> None:
        devices: set[torch.device] = set()
        snapshot = _to_cpu_copy(checkpoint, devices)
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

    def run(self, work) -> None:
        """Any other slow output (a TensorBoard figure), on the same thread, in order."""
        self._pending.append(self._pool.submit(work))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write here, in the training thread

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


def peek_checkpoint(path: str | Path) -> dict | None:
    """A train.py checkpoint's entries, or None for a file that is not one.

    mmap reads only the pickled header and maps the tensors without reading them, so
    looking at a ViT-B checkpoint's epoch, metrics or args is cheap.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def find_checkpoint(folder: str | Path) -> Path | None:
    """best.pth in folder, else the newest model-*.pth by epoch number, else None."""
    folder = Path(folder)
    if (folder / "best.pth").is_file():
        return folder / "best.pth"
    epochs = epoch_checkpoints(folder)
    return epochs[-1][1] if epochs else None
