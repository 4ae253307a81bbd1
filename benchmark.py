"""Speed, measured side by side in one process: the model, the data pipeline, whole runs.

    python benchmark.py                                  # model: ours vs timm vs torchvision
    python benchmark.py --compile                        # ... and each under torch.compile
    python benchmark.py --data                           # + PIL DataLoader vs ImageFolder vs device
    python benchmark.py --no-model --e2e                 # reference pipeline vs train.py, 10 epochs
    python benchmark.py --device cpu --model-name vit_small_patch16_224   # a CPU-sized model

Sections (in the order they run):
  model     train steps (AdamW, forward + backward + step, autocast in --dtype on CUDA) and
            inference (inference_mode) images/s of this project's model, timm's and
            torchvision's at the same configuration, batch and dtype; ratios against timm
            eager (--model, on by default).
  profile   where one training step's time goes: wall clock against GPU busy time, eager and
            replayed as a CUDA graph (--profile).
  backbone  the frozen backbone's forward pass at each of --backbone-batches: what
            --frozen-batch chooses between (--backbone-batches B,B).
  data      images/s of one training epoch through my_dataset.MyDataSet in a DataLoader,
            torchvision's ImageFolder with the same transforms, and
            device_data.DeviceTrainLoader (decoding once, then epochs on the device), over a
            generated stand-in folder (--data).
  memory    peak GPU memory of unfrozen SGD steps, ViT-B/16 and ViT-L/16, with and without
            --grad-checkpointing (--memory, CUDA only).
  e2e       wall-clock seconds of whole training runs on the stand-in at each of
            --e2e-batch-sizes (default: --e2e-batch-size, 32): the reference pipeline
            (ImageFolder + timm ViT, the report's transforms, bf16 on CUDA, SGD as the report)
            against train.py itself (train.main in this process), frozen and unfrozen, with
            an MFU column where the device's peak is known (--e2e; --e2e-projection adds
            device_data's loaders + our model in the reference's loop).
  cache     frozen --no-augment train.py runs: one backbone pass per batch, grouped
            (--frozen-batch 128) and from cached training features (--e2e-cache).

Whole runs (memory, e2e, cache) are kept in --json as each ends, so a command killed by a
time limit keeps what it measured; --time-budget SECONDS starts no run after that many
seconds, and the e2e runs go most wanted first (the reference and train.py as it comes, at
every batch and mode, before any variant).

The stand-in for flower_photos has the same class counts (3670 images, 2939 / 731 after the
split) and JPEGs of the same size and weight (500x375, about 24 KiB), drawn from
demo_data's flowers, upscaled, with noise: real photographs decode at about the same speed,
but the accuracy printed in the e2e section means nothing. timm and torchvision are only
needed here and in the tests; a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from checkpoints import atomic_write_bytes, newest_epoch_checkpoint, peek_checkpoint
from cli import INTERRUPTED_STATUS, TERMINATED_STATUS, run_main
from demo_data import draw_image
from download import FLOWER_CLASS_COUNTS
from errors import UserError, check_output_file, writing
from my_dataset import MyDataSet, build_transforms
from utils import autocast, read_split_data
from vit_model import VisionTransformer, create_model, list_models

STANDIN_SIZE = (500, 375)  # width, height: flower_photos' most common size
# Quality 75 with this noise gives ~24 KiB files, as flower_photos' average.
STANDIN_QUALITY = 75


# --------------------------------------------------------------------------- stand-in data

def _standin_image(job: tuple[str, int, int, str]) -> None:
    """Write one stand-in JPEG: a demo_data flower at 128 px, upscaled, with two noises."""
    kind, index, seed, path = job
    rng = random.Random(seed * 1_000_003 + hash_name(kind) * 10_007 + index)
    width, height = STANDIN_SIZE
    picture = draw_image(kind, rng, 128).resize(STANDIN_SIZE, Image.BICUBIC)
    noise_rng = np.random.default_rng(rng.randrange(2**32))
    # Coarse colour blotches (texture a JPEG must spend bits on) and fine sensor-like grain.
    coarse = noise_rng.normal(128, 15, (height // 8 + 1, width // 8 + 1, 3))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(STANDIN_SIZE,
                                                                              Image.BICUBIC)
    grain = noise_rng.normal(0, 3, (height, width, 1))
    pixels = (np.asarray(picture, np.float32) + np.asarray(coarse, np.float32) - 128 + grain)
    tmp = Path(path).with_suffix(".tmp")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        tmp, format="JPEG", quality=STANDIN_QUALITY)
    tmp.replace(path)  # never leave a half-written image that looks finished


def hash_name(name: str) -> int:
    """A stable small hash (Python's hash() of a str changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def standin_counts(scale: float) -> dict[str, int]:
    """flower_photos' class folders, each with its image count scaled by `scale`."""
    # At least 5 per class, so that the 20% validation split keeps one of each.
    return {name: max(5, round(count * scale)) for name, count in FLOWER_CLASS_COUNTS.items()}


def make_standin(root: str | Path, scale: float = 1.0, seed: int = 0,
                 workers: int | None = None) -> Path:
    """A flower_photos-shaped folder of JPEGs under root; the same files for the same seed.

    scale multiplies the class counts (1.0: 3670 images). Files already there are kept.
    """
    root = Path(root)
    jobs = []
    for kind, count in standin_counts(scale).items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / kind / f"{kind}_{i:04d}.jpg"
            if not path.exists():
                jobs.append((kind, i, seed, str(path)))
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    if workers > 1:
        import multiprocessing

        # fork: the children need no fresh interpreter (nothing on CUDA has been touched yet).
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_standin_image, jobs, chunksize=16))
    else:
        for job in jobs:
            _standin_image(job)
    return root


# --------------------------------------------------------------------------- small helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Progress:
    """What the sections measured so far, rewritten to --json after every whole run (a run
    cut off by a time limit keeps the rows before it), and --time-budget: the seconds from
    the benchmark's start after which no new run starts."""

    results: dict
    json_path: Path | None
    budget_s: float | None
    start: float = field(default_factory=time.perf_counter)
    not_started: list[str] = field(default_factory=list)

    def may_start(self, label: str) -> bool:
        """Whether the run `label` fits the budget; if not, it is listed as not started."""
        if self.budget_s is None or time.perf_counter() - self.start < self.budget_s:
            return True
        self.not_started.append(label)
        return False

    def keep(self, section: str, row: dict) -> None:
        """One more row of `section`, saved now; the section's whole table replaces these
        rows when it ends."""
        self.results.setdefault(section, []).append(row)
        self.save()

    def save(self) -> None:
        if self.json_path is not None:
            atomic_write_bytes(self.json_path,
                               (json.dumps(self.results, indent=2) + "\n").encode())


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return "-" if value is None else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    # Numbers (and missing numbers) right-aligned, text left-aligned.
    lines += ["  ".join(text.rjust(w) if value is None or isinstance(value, int | float)
                        else text.ljust(w)
                        for value, text, w in zip(raw, row, widths, strict=True)).rstrip()
              for raw, row in zip(rows, cells, strict=True)]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def versions() -> dict[str, str]:
    import torchvision

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "torchvision": torchvision.__version__}
    try:
        import timm

        found["timm"] = timm.__version__
    except ImportError:
        found["timm"] = "not installed"
    return found


# --------------------------------------------------------------------------- model section

PEERS = ("ours", "timm", "torchvision")  # the model section's models, by --models name


def peer_models(model_name: str, wanted: list[str]) -> list[tuple[str, Callable[[], nn.Module],
                                                                  str]]:
    """(label, factory, note) for ours and the peers at our model's configuration."""
    config = create_model(model_name).model_args
    same_as_b16 = (config["patch_size"], config["embed_dim"], config["depth"],
                   config["num_heads"], config["img_size"]) == (16, 768, 12, 12, 224)
    models = []
    if "ours" in wanted:
        models.append(("ours", lambda: create_model(model_name), model_name))
    if "timm" in wanted:
        try:
            import timm
            from timm.models.vision_transformer import VisionTransformer as TimmViT
        except ImportError:
            print("note: timm is not installed; its rows are skipped (pip install timm).")
        else:
            if timm.list_models(model_name) == [model_name]:
                models.append(("timm", lambda: timm.create_model(model_name, pretrained=False),
                               f"timm {model_name}"))
            else:
                keys = ("img_size", "patch_size", "num_classes", "embed_dim", "depth",
                        "num_heads", "mlp_ratio", "qkv_bias")
                models.append(("timm", lambda: TimmViT(**{k: config[k] for k in keys}),
                               "timm VisionTransformer, same config"))
    if "torchvision" in wanted:
        import torchvision.models as tvm
        from torchvision.models.vision_transformer import VisionTransformer as TvViT

        if same_as_b16 and config["num_classes"] == 1000:
            models.append(("torchvision", lambda: tvm.vit_b_16(weights=None),
                           "torchvision vit_b_16"))
        else:
            # torchvision names only B/L/H sizes; its class builds any other configuration.
            models.append(("torchvision", lambda: TvViT(
                image_size=config["img_size"], patch_size=config["patch_size"],
                num_layers=config["depth"], num_heads=config["num_heads"],
                hidden_dim=config["embed_dim"],
                mlp_dim=int(config["embed_dim"] * config["mlp_ratio"]),
                num_classes=config["num_classes"]), "torchvision VisionTransformer, same config"))
    return models


def time_loop(step: Callable[[], None], device: torch.device, warmup: int, steps: int,
              repeats: int) -> float:
    """Median seconds per step over `repeats` timed windows of `steps`, after warm-up."""
    for _ in range(warmup):
        step()
    sync(device)
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        windows.append((time.perf_counter() - start) / steps)
    return statistics.median(windows)


def bench_model(factory: Callable[[], nn.Module], args: argparse.Namespace,
                device: torch.device, dtype: torch.dtype | None, compiled: bool
                ) -> dict[str, float]:
    """Train and inference images/s of one model."""
    model = factory().to(device)
    run = torch.compile(model) if compiled else model
    train = time_train(model, run, args, device, dtype)
    free_memory(device)
    infer = time_inference(model, run, args, device, dtype)
    del run, model
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs before the next model
    free_memory(device)
    return {"train": train, "infer": infer}


def time_train(model: nn.Module, run: Callable, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype | None) -> float:
    """Images/s of AdamW steps: forward and loss under autocast, backward, step."""
    size = _input_size(model)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, _num_classes(model), (args.batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast(device.type, dtype):
            loss = loss_fn(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return args.batch_size / time_loop(step, device, args.warmup, args.steps, args.repeats)


def time_inference(model: nn.Module, run: Callable, args: argparse.Namespace,
                   device: torch.device, dtype: torch.dtype | None) -> float:
    """Images/s of forward passes under inference_mode and autocast."""
    size = _input_size(model)
    x = torch.randn(args.infer_batch_size, 3, size, size, device=device)

    def step() -> None:
        with torch.inference_mode(), autocast(device.type, dtype):
            run(x)

    model.eval()
    return args.infer_batch_size / time_loop(step, device, args.warmup, args.steps, args.repeats)


def profile_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None
                    ) -> list[dict]:
    """Where a training step's time goes at --batch-size: wall clock against GPU busy time.

    A step whose wall time far exceeds its GPU time is bound by launching kernels from
    Python; CUDA graphs (replaying the whole forward and backward as one launch) are then
    the lever, and this section times them too (torch.cuda.make_graphed_callables).
    """
    rows = [profile_step(args, device, dtype, graphed)
            for graphed in ((False, True) if device.type == "cuda" else (False,))]
    print(format_table(["mode", "step ms", "GPU busy ms", "kernels/step", "img/s"],
                       [[r["mode"], r["step_ms"], r["gpu_busy_ms"], r["kernels_per_step"],
                         r["img_s"]] for r in rows]))
    return rows


def profile_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                 graphed: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = create_model(args.model_name, num_classes=5).to(device).train()
    size = model.image_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, 5, (args.batch_size,), device=device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, **fused)
    run = model
    if graphed:  # autocast's weight cache cannot live across graph replays
        with autocast(device.type, dtype, cache_enabled=False):
            run = torch.cuda.make_graphed_callables(model, (x,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with autocast(device.type, dtype, cache_enabled=not graphed):
            loss = loss_fn(run(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    per_step = time_loop(step, device, args.warmup, args.steps, args.repeats)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync(device)
    events = prof.key_averages()
    busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                  for e in events)
    kernels = sum(e.count for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
    free_memory(device)
    return {"mode": "CUDA graph" if graphed else "eager", "step_ms": per_step * 1e3,
            "gpu_busy_ms": busy_us / 5 / 1e3, "kernels_per_step": kernels / 5,
            "img_s": args.batch_size / per_step}


def _input_size(model: nn.Module) -> int:
    """The side of a square input: ours and torchvision's say it as image_size; timm's
    VisionTransformer has no such attribute, its patch embedding keeps an (H, W) pair."""
    if hasattr(model, "image_size"):
        return model.image_size
    return model.patch_embed.img_size[0]  # timm


def _num_classes(model: nn.Module) -> int:
    if hasattr(model, "num_classes"):
        return model.num_classes
    return model.heads.head.out_features  # torchvision


def model_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None
                  ) -> list[dict]:
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    models = peer_models(args.model_name, wanted)
    # Every eager row first: compiling takes minutes, and a run cut short keeps those.
    for compiled in [False, True] if args.compile else [False]:
        for label, factory, note in models:
            mode = "compiled" if compiled else "eager"
            print(f"  {label} {mode} ...", flush=True)
            try:
                speed = bench_model(factory, args, device, dtype, compiled)
            except Exception as err:  # e.g. a compiler failure: keep the other rows
                traceback.print_exc()
                print(f"  {label} {mode} failed: {type(err).__name__}: {err}")
                free_memory(device)
                continue
            rows.append({"model": label, "mode": mode, "train_img_s": speed["train"],
                         "infer_img_s": speed["infer"], "implementation": note})
            print(f"    train {speed['train']:,.1f} img/s, inference {speed['infer']:,.1f} img/s",
                  flush=True)
    base = next((r for r in rows if r["model"] == "timm" and r["mode"] == "eager"), None)
    for row in rows:
        row["train_vs_timm"] = row["train_img_s"] / base["train_img_s"] if base else None
        row["infer_vs_timm"] = row["infer_img_s"] / base["infer_img_s"] if base else None
    print(format_table(
        ["model", "mode", "train img/s", "infer img/s", "train / timm", "infer / timm",
         "implementation"],
        [[r["model"], r["mode"], r["train_img_s"], r["infer_img_s"], r["train_vs_timm"],
          r["infer_vs_timm"], r["implementation"]] for r in rows]))
    return rows


# --------------------------------------------------------------------------- data section

def _imagefolder_subset(root: Path, images: list[Path], transform):
    """ImageFolder over root, narrowed to `images` (the split's files), in their order."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root), transform=transform)
    where = {Path(path).resolve(): i for i, (path, _) in enumerate(folder.samples)}
    return Subset(folder, [where[Path(p).resolve()] for p in images])


def _loader(dataset, args: argparse.Namespace, device: torch.device, shuffle: bool):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=args.e2e_batch_size, shuffle=shuffle,
                      num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.workers > 0)


def _epoch(loader, device: torch.device) -> tuple[float, int]:
    """Seconds to pull one epoch onto the device, and the image count."""
    start = time.perf_counter()
    seen = 0
    for images, _labels in loader:
        images = images.to(device, non_blocking=True)
        seen += images.shape[0]
    sync(device)
    return time.perf_counter() - start, seen


def data_section(args: argparse.Namespace, device: torch.device, root: Path) -> list[dict]:
    from device_data import DeviceTrainLoader

    split = read_split_data(root, verify=False)
    size = args.img_size
    rows = []

    def record(name: str, first_s: float, steady_s: float, count: int, note: str) -> None:
        rows.append({"pipeline": name, "images": count, "first_epoch_s": first_s,
                     "steady_epoch_s": steady_s, "img_s": count / steady_s, "note": note})

    train_tf = build_transforms(size, train=True)
    candidates = [("MyDataSet + DataLoader", lambda: MyDataSet(split.train_images,
                                                               split.train_labels, train_tf)),
                  ("ImageFolder + DataLoader",
                   lambda: _imagefolder_subset(root, split.train_images, train_tf))]
    for name, make in candidates:
        loader = _loader(make(), args, device, shuffle=True)
        first, count = _epoch(loader, device)   # includes starting the workers
        steady, _ = _epoch(loader, device)
        record(name, first, steady, count, f"{args.workers} workers, batch "
                                           f"{args.e2e_batch_size}, PIL decode every epoch")
        del loader

    start = time.perf_counter()
    device_loader = DeviceTrainLoader.from_files(split.train_images, split.train_labels,
                                                 img_size=size, batch_size=args.e2e_batch_size,
                                                 device=device)
    sync(device)
    decode_s = time.perf_counter() - start
    count = device_loader.num_samples
    record("DeviceTrainLoader decode", decode_s, decode_s, count,
           "read + decode once, on " + device.type)
    epochs = []
    for _ in range(2):
        start = time.perf_counter()
        for _images, _labels in device_loader:
            pass
        sync(device)
        epochs.append(time.perf_counter() - start)
    record("DeviceTrainLoader epoch", epochs[0], epochs[1], count,
           "crop + resize + flip on " + device.type)
    del device_loader
    free_memory(device)
    print(format_table(["pipeline", "images", "1st epoch s", "epoch s", "img/s", "note"],
                       [[r["pipeline"], r["images"], r["first_epoch_s"], r["steady_epoch_s"],
                         r["img_s"], r["note"]] for r in rows]))
    return rows


# --------------------------------------------------------------------------- e2e section

def reference_model(model_name: str, num_classes: int) -> nn.Module:
    """timm's model of our `model_name` configuration (timm's factory when it has the name)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if timm.list_models(model_name) == [model_name]:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    config = create_model(model_name).model_args
    keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
            "qkv_bias")
    return TimmViT(num_classes=num_classes, **{k: config[k] for k in keys})


def report_schedule(epochs: int, lrf: float = 0.01) -> Callable[[int], float]:
    """The report's cosine factor on the learning rate, from 1 down to lrf."""
    return lambda epoch: ((1 + math.cos(epoch * math.pi / epochs)) / 2) * (1 - lrf) + lrf


def run_loop(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
             root: Path, frozen: bool, pipeline: str) -> dict:
    """A whole training run outside train.py; wall-clock seconds from split to last epoch.

    pipeline "reference": ImageFolder + DataLoader + timm, as the peers measured.
    pipeline "projection": device_data's loaders + this project's model in the same loop: what
    train.py with the device pipeline and autocast can reach.
    """
    start = time.perf_counter()
    split = read_split_data(root)
    num_classes = len(split.class_names)
    if pipeline == "reference":
        model = reference_model(args.e2e_model, num_classes)
        size = _input_size(model)
        train_loader = _loader(_imagefolder_subset(root, split.train_images,
                                                   build_transforms(size, True)),
                               args, device, shuffle=True)
        val_loader = _loader(_imagefolder_subset(root, split.val_images,
                                                 build_transforms(size, False)),
                             args, device, shuffle=False)
    else:
        from device_data import DeviceEvalLoader, DeviceTrainLoader

        model = create_model(args.e2e_model, num_classes=num_classes)
        size = model.image_size
        common = dict(img_size=size, batch_size=args.e2e_batch_size, device=device)
        train_loader = DeviceTrainLoader.from_files(split.train_images, split.train_labels,
                                                    **common)
        val_loader = DeviceEvalLoader.from_files(split.val_images, split.val_labels, **common)
    model.to(device)
    head = "head."
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen or name.startswith(head))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, report_schedule(args.e2e_epochs))
    loss_fn = nn.CrossEntropyLoss()
    correct = seen = 0
    for _epoch_index in range(args.e2e_epochs):
        model.train()
        for images, labels in train_loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device.type, dtype):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        with torch.no_grad():
            for images, labels in val_loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast(device.type, dtype):
                    correct += (model(images).argmax(1) == labels).sum()
                seen += labels.shape[0]
    accuracy = correct.item() / max(seen, 1)  # .item() waits for the device
    seconds = time.perf_counter() - start
    del model, optimizer, train_loader, val_loader
    free_memory(device)
    return {"seconds": seconds, "val_acc": accuracy, "ok": True}


def train_py_argv(args: argparse.Namespace, device: torch.device, root: Path, out: Path,
                  frozen: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """train.py's command line for this run."""
    argv = ["--data-path", str(root), "--model-name", args.e2e_model, "--weights", "",
            "--batch-size", str(args.e2e_batch_size), "--epochs", str(args.e2e_epochs),
            "--workers", str(args.workers), "--device", str(device),
            "--output-dir", str(out / "weights"), "--log-dir", str(out / "runs"),
            "--freeze-layers" if frozen else "--no-freeze-layers"]
    # Autocast on both sides, or float32 on both sides.
    argv.append("--amp" if device.type == "cuda" and args.dtype != "fp32" else "--no-amp")
    if args.e2e_device_data:
        argv.append("--device-data")
    if args.e2e_compile:
        argv.append("--compile")
    # The reference saves nothing; train.py saves every epoch, and its time counts.
    return argv + ["--keep", "1"] + list(extra)


def run_train_py(args: argparse.Namespace, device: torch.device, root: Path, frozen: bool,
                 log: Path, notes: list[str], extra: tuple[str, ...] = ()) -> dict:
    """train.main in this process, its output appended to `log`; wall-clock seconds, and
    from its last checkpoint the best validation accuracy and the last epoch's
    training-phase speed (the rest of an epoch is validation, checkpointing and logging)."""
    import train

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        argv = train_py_argv(args, device, root, Path(tmp), frozen, extra)
        captured = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                status = train.main(argv)
            except SystemExit as exit_:  # argparse rejecting a flag exits
                status = exit_.code if isinstance(exit_.code, int) else 1
        if status in (INTERRUPTED_STATUS, TERMINATED_STATUS):  # Ctrl-C or SIGTERM, which
            raise KeyboardInterrupt                            # train.py answered: stop too
        sync(device)
        seconds = time.perf_counter() - start
        last = newest_epoch_checkpoint(Path(tmp) / "weights")
        checkpoint = peek_checkpoint(last) if last is not None else None
        metrics = checkpoint.metrics if checkpoint is not None else {}
        # The best validation accuracy of a finished run, as train.py's last line prints it.
        accuracy = checkpoint.best_acc if checkpoint is not None and status == 0 else None
    with log.open("a") as handle:
        handle.write(f"$ python train.py {' '.join(argv)}\n{captured.getvalue()}\n")
    if status != 0:
        tail = captured.getvalue().strip().splitlines()[-3:]
        notes.append(f"train.py exited with {status}: {' | '.join(tail)}")
    if "--compile" in argv:
        # As a fresh process would: the next compiled run (another batch size) compiles for
        # its own shape instead of inheriting this run's guards and turning dynamic.
        torch._dynamo.reset()
    free_memory(device)
    return {"seconds": seconds, "val_acc": accuracy, "ok": status == 0,
            "argv": "python train.py " + " ".join(argv),
            "train_img_s": metrics.get("images_per_sec")}


def e2e_variants(text: str, mode: str) -> list[tuple[str, ...]]:
    """--e2e-variants' flag sets for `mode`: ';'-separated, each for both modes or, written
    'frozen:FLAGS' or 'unfrozen:FLAGS', for that mode only."""
    variants = []
    for entry in text.split(";"):
        only, _, flags = entry.strip().partition(":") if entry.strip().startswith(
            ("frozen:", "unfrozen:")) else ("", "", entry)
        if flags.strip() and only in ("", mode):
            variants.append(tuple(flags.split()))
    return variants


def e2e_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                root: Path, log: Path, notes: list[str], progress: Progress) -> list[dict]:
    try:
        import timm  # noqa: F401
    except ImportError:
        notes.append("timm is not installed: the e2e reference runs are skipped.")
        have_timm = False
    else:
        have_timm = True
    rows = timed_rows(device, notes, progress, "e2e",
                      e2e_plan(args, device, dtype, root, log, notes, have_timm))
    for row in rows:
        reference = next((r for r in rows if (r["mode"], r["batch"]) == (row["mode"], row["batch"])
                          and r["pipeline"].startswith("reference")), None)
        row["speedup_vs_reference"] = (reference["seconds"] / row["seconds"]
                                       if reference else None)
    # The table by batch and mode, each group in the order its runs were planned.
    batches, modes = e2e_batch_sizes(args), e2e_modes(args)
    rows.sort(key=lambda r: (batches.index(r["batch"]), modes.index(r["mode"])))
    add_mfu(rows, args, device, dtype, notes)
    print_e2e_table(rows)
    return rows


E2E_MODES = ("frozen", "unfrozen")


def e2e_modes(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.e2e_modes.split(",") if m.strip()]


def e2e_batch_sizes(args: argparse.Namespace) -> list[int]:
    if not args.e2e_batch_sizes:
        return [args.e2e_batch_size]
    return [int(b) for b in args.e2e_batch_sizes.split(",") if b.strip()]


def per_batch_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """A copy of args for each of e2e_batch_sizes, with that batch as its e2e_batch_size."""
    return [argparse.Namespace(**{**vars(args), "e2e_batch_size": batch})
            for batch in e2e_batch_sizes(args)]


@dataclass
class PlannedRun:
    """One whole run of a table: its mode, its args (e2e_batch_size is its batch), its
    pipeline's name, and the run itself, which returns its result dict."""

    mode: str
    args: argparse.Namespace
    pipeline: str
    run: Callable[[], dict]

    @property
    def label(self) -> str:
        return f"{self.mode}, batch {self.args.e2e_batch_size}: {self.pipeline}"


def e2e_plan(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
             root: Path, log: Path, notes: list[str], have_timm: bool) -> list[PlannedRun]:
    """Every e2e run, most wanted first: at each batch and mode the reference and train.py as
    a user runs it (the issue's target rows), then train.py with each of --e2e-variants' flag
    sets, then the projection. A --time-budget cuts from the end."""
    targets, variants, projections = [], [], []
    for batch_args in per_batch_args(args):
        for mode in e2e_modes(args):
            frozen = mode == "frozen"
            if have_timm:
                targets.append(PlannedRun(mode, batch_args, "reference: ImageFolder + timm",
                                          functools.partial(run_loop, batch_args, device, dtype,
                                                            root, frozen, "reference")))
            plain, *extra = train_py_runs(batch_args, device, root, log, notes, mode,
                                          [(), *e2e_variants(args.e2e_variants, mode)])
            targets.append(plain)
            variants += extra
            if args.e2e_projection:
                projections.append(PlannedRun(
                    mode, batch_args, "device_data loaders + ours (loop here)",
                    functools.partial(run_loop, batch_args, device, dtype, root, frozen,
                                      "projection")))
    return targets + variants + projections


def train_py_runs(args: argparse.Namespace, device: torch.device, root: Path, log: Path,
                  notes: list[str], mode: str, variants: list[tuple[str, ...]]
                  ) -> list[PlannedRun]:
    """A train.py run for each flag set in `variants`, named by its flags."""
    return [PlannedRun(mode, args, " ".join(("train.py", *variant)),
                       functools.partial(run_train_py, args, device, root, mode == "frozen",
                                         log, notes, variant))
            for variant in variants]


def timed_rows(device: torch.device, notes: list[str], progress: Progress, section: str,
               runs: list[PlannedRun]) -> list[dict]:
    """Each run in turn, as a row of `section`'s table, kept in the JSON as soon as it ends;
    a failed run becomes a failed row, and a run the time budget has no room for is not
    started."""
    rows = []
    for planned in runs:
        if not progress.may_start(planned.label):
            continue
        print(f"  {planned.label} ...", flush=True)
        try:
            result = planned.run()
        except Exception as err:  # one failed run must not lose the others
            traceback.print_exc()
            notes.append(f"{planned.label} failed: {type(err).__name__}: {err}")
            result = {"seconds": math.nan, "val_acc": None, "ok": False}
            free_memory(device)
        epochs = planned.args.e2e_epochs
        rows.append({"mode": planned.mode, "batch": planned.args.e2e_batch_size,
                     "pipeline": planned.pipeline, "epochs": epochs,
                     "seconds": result["seconds"], "s_per_epoch": result["seconds"] / epochs,
                     "val_acc": result["val_acc"], "ok": result["ok"],
                     "train_img_s": result.get("train_img_s"),
                     **({"argv": result["argv"]} if "argv" in result else {})})
        progress.keep(section, rows[-1])
        # Each result as it comes: a run cut short by a time limit keeps the earlier ones.
        print(f"  {planned.label}: {result['seconds']:.1f} s", flush=True)
    return rows


def print_e2e_table(rows: list[dict]) -> None:
    if not rows:  # every run left out by --time-budget: the note names them
        return
    print(format_table(["mode", "batch", "pipeline", "epochs", "total s", "s/epoch",
                        "speed-up", "val acc", "last epoch train img/s", "MFU"],
                       [[r["mode"], r["batch"], r["pipeline"], r["epochs"], r["seconds"],
                         r["s_per_epoch"], r["speedup_vs_reference"], r["val_acc"],
                         r["train_img_s"], r.get("mfu")] for r in rows]))


# Issue 10's cache row: a frozen run without augmentation, one backbone pass per batch
# (train.py's default), grouped, and from cached training features. On CUDA train.py replays
# CUDA graphs by default, and they take precedence over grouping and the cache (which would
# then be turned off with a note): those two rows turn the graphs off. The first row keeps
# train.py's default (graphed on CUDA), so both speed-ups are against what a user gets without
# the flag, the bar an opt-in path has to clear. On the CPU --no-cuda-graphs changes nothing.
CACHE_ROW_VARIANTS = (("--no-augment",),
                      ("--no-augment", "--no-cuda-graphs", "--frozen-batch", "128"),
                      ("--no-augment", "--no-cuda-graphs", "--cache-train-features"))


def cache_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                  root: Path, log: Path, notes: list[str], progress: Progress) -> list[dict]:
    """CACHE_ROW_VARIANTS' frozen train.py runs; speed-up against the per-batch one."""
    rows = []
    for batch_args in per_batch_args(args):
        runs = timed_rows(device, notes, progress, "cache", train_py_runs(
            batch_args, device, root, log, notes, "frozen", list(CACHE_ROW_VARIANTS)))
        per_batch = runs[0] if runs and runs[0]["pipeline"] == " ".join(
            ("train.py", *CACHE_ROW_VARIANTS[0])) else None
        for row in runs:
            row["speedup_vs_reference"] = (per_batch["seconds"] / row["seconds"]
                                           if per_batch else None)
        rows += runs
    add_mfu(rows, args, device, dtype, notes)
    print_e2e_table(rows)
    return rows


# --------------------------------------------------------------------------- frozen batch

def backbone_batch_section(args: argparse.Namespace, device: torch.device,
                           dtype: torch.dtype | None) -> list[dict]:
    """The frozen backbone's no-grad forward pass (train.py's class tokens) at each of
    --backbone-batches: what --frozen-batch chooses between. Images per CPU-second beside
    images/s: on a shared CPU the load moves the second far more than the first."""
    from frozen_features import backbone_pass

    model = create_model(args.model_name, num_classes=5).to(device).eval()
    size = model.image_size
    rows = []
    for batch in [int(b) for b in args.backbone_batches.split(",") if b.strip()]:
        x = torch.randn(batch, 3, size, size, device=device)
        backbone_pass(model, x, dtype)  # warm-up
        sync(device)
        images, wall, cpu = 0, time.perf_counter(), time.process_time()
        while images < max(batch, args.backbone_images):
            backbone_pass(model, x, dtype)
            images += batch
        sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"batch": batch, "images": images, "img_s": images / wall,
                     "img_per_cpu_s": images / cpu})
        print(f"  batch {batch}: {images / wall:,.2f} img/s", flush=True)
    free_memory(device)
    print(format_table(["batch", "images", "img/s", "img per CPU-s"],
                       [[r["batch"], r["images"], r["img_s"], r["img_per_cpu_s"]]
                        for r in rows]))
    return rows


# --------------------------------------------------------------------------- memory

MEMORY_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224")


def memory_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                   notes: list[str], progress: Progress) -> list[dict]:
    """Peak memory and speed of unfrozen SGD steps, with and without gradient checkpointing."""
    if device.type != "cuda":
        notes.append("the memory section needs CUDA (its allocator counts the peak); skipped.")
        return []
    rows = []
    for model_name in MEMORY_MODELS:
        model = None  # made once per model, when its first row may start
        for batch in e2e_batch_sizes(args):
            for checkpointing in (False, True):
                label = f"{model_name}, batch {batch}, checkpointing {checkpointing}"
                if not progress.may_start(label):
                    continue
                print(f"  {label} ...", flush=True)
                if model is None:
                    model = create_model(model_name, num_classes=5).to(device)
                rows.append({"model": model_name, "batch": batch,
                             "grad_checkpointing": checkpointing,
                             **memory_row(model, batch, checkpointing, args, device, dtype)})
                progress.keep("memory", rows[-1])
        del model
        free_memory(device)
    print(format_table(["model", "batch", "grad checkpointing", "peak GiB", "train img/s"],
                       [[r["model"], r["batch"], "on" if r["grad_checkpointing"] else "off",
                         r["peak_gib"], r["img_s"]] for r in rows]))
    return rows


def memory_row(model: VisionTransformer, batch: int, checkpointing: bool,
               args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None
               ) -> dict:
    """Peak GiB and images/s of SGD steps at `batch`; the momentum buffers are made anew, so
    each row counts the same tensors: weights, gradients, momentum and activations."""
    model.train().set_grad_checkpointing(checkpointing)
    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with autocast(device.type, dtype):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # the momentum buffers exist from here on, as in a run
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = time_loop(step, device, 1, args.steps, 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    optimizer.zero_grad(set_to_none=True)  # the next row starts without this one's tensors
    return {"peak_gib": peak, "img_s": batch / seconds}


# --------------------------------------------------------------------------- MFU

# Dense bfloat16 tensor-core peaks, FLOP/s, as the vendor's data sheets give them for the SXM
# modules. The PCIe and NVL cards of the same name run lower clocks: for them MFU is left out
# unless --peak-tflops gives their peak.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
OTHER_FORM_FACTORS = ("pcie", "nvl")


def training_flops_per_image(model_name: str, frozen: bool) -> float:
    """FLOPs of one training image, counting a multiply-add as 2 (as peak FLOP/s do).

    flops.py counts multiply-adds (fvcore's convention). Unfrozen, a step costs the forward
    pass and a backward pass of about twice that: 3x. Frozen, the backward pass stops at the
    head, so the forward pass is nearly all of it: 1x.
    """
    return 2 * forward_multiply_adds(model_name) * (1 if frozen else 3)


@functools.cache  # one count per model (and so per input size), not one per table row
def forward_multiply_adds(model_name: str) -> int:
    """flops.py's multiply-adds of one image's forward pass at the model's own input size."""
    from flops import build_on_meta, module_macs

    model = build_on_meta(model_name, num_classes=5)
    side = model.image_size
    return module_macs(model, torch.empty(1, 3, side, side, device="meta"))[""]


def peak_flops(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None
               ) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return known_bf16_peak(torch.cuda.get_device_name(device))


def known_bf16_peak(gpu_name: str) -> float | None:
    """PEAK_BF16_FLOPS' figure for a GPU named as CUDA names it, or None if it has none."""
    if any(form in gpu_name.lower() for form in OTHER_FORM_FACTORS):
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in gpu_name), None)


def add_mfu(rows: list[dict], args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype | None, notes: list[str]) -> None:
    """Model FLOP utilisation of train.py's training phase (its last epoch's images/s)."""
    peak = peak_flops(args, device, dtype)
    if peak is None:
        notes.append(f"MFU is left out: no peak FLOP/s is known for {device_name(device)} at "
                     f"{args.dtype} (give one with --peak-tflops).")
    for row in rows:
        row["mfu"] = None
        # With cached features the training phase runs no backbone: no FLOPs to credit.
        if peak is None or not row.get("train_img_s") or "--cache-train-features" in row[
                "pipeline"]:
            continue
        flops = training_flops_per_image(args.e2e_model, row["mode"] == "frozen")
        row["mfu"] = row["train_img_s"] * flops / peak


# --------------------------------------------------------------------------- main

class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in --help, except None: those flags' help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description="Measure this project's speed against timm and torchvision, side by side.",
        formatter_class=DefaultsHelp)
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda[:N] or cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                        help="the model section")
    parser.add_argument("--model-name", default="vit_base_patch16_224", choices=list_models(),
                        metavar="NAME", help="our registry name; the peers match its config")
    parser.add_argument("--models", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="train batch of the model section (default: 128 CUDA, 4 CPU)")
    parser.add_argument("--infer-batch-size", type=int, default=None,
                        help="inference batch (default: 256 CUDA, 8 CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per window (default: 20 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed windows; the median counts (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--profile", action="store_true",
                        help="where a training step's time goes at --batch-size (SGD, our "
                             "model): wall vs GPU busy, eager and as a CUDA graph")
    parser.add_argument("--data", action="store_true", help="the data pipeline section")
    parser.add_argument("--img-size", type=int, default=224, help="image size of --data")
    add_whole_run_flags(parser)
    add_data_and_output_flags(parser)
    return parser


def add_whole_run_flags(parser: argparse.ArgumentParser) -> None:
    """The e2e, cache, memory and backbone sections' flags."""
    parser.add_argument("--e2e", action="store_true", help="the whole-run section")
    parser.add_argument("--e2e-model", default="vit_base_patch16_224", choices=list_models(),
                        metavar="NAME", help="model of the e2e runs (timm's for the reference)")
    parser.add_argument("--e2e-epochs", type=int, default=10)
    parser.add_argument("--e2e-batch-size", type=int, default=32,
                        help="batch of the e2e runs and of --data")
    parser.add_argument("--e2e-batch-sizes", default=None, metavar="B,B",
                        help="comma-separated batches of the e2e runs, each a full set "
                             "(default: --e2e-batch-size)")
    parser.add_argument("--e2e-modes", default=",".join(E2E_MODES),
                        help=f"comma-separated subset of {','.join(E2E_MODES)}")
    parser.add_argument("--e2e-scale", type=float, default=1.0,
                        help="fraction of flower_photos' 3670 images in the stand-in")
    parser.add_argument("--e2e-device-data", action=argparse.BooleanOptionalAction,
                        default=True, help="pass --device-data to train.py")
    parser.add_argument("--e2e-compile", action="store_true",
                        help="pass --compile to train.py")
    parser.add_argument("--e2e-variants", default="",
                        help="';'-separated sets of extra train.py flags, one more train.py "
                             "run each; 'frozen:FLAGS' or 'unfrozen:FLAGS' for one mode only; "
                             "give it with '=': --e2e-variants='--no-cuda-graphs'")
    parser.add_argument("--e2e-cache", action="store_true",
                        help="issue 10's cache row, at each e2e batch: frozen train.py runs "
                             "with --no-augment, one backbone pass per batch, grouped, and "
                             "--cache-train-features (the last two with --no-cuda-graphs, "
                             "which they need on CUDA)")
    parser.add_argument("--memory", action="store_true",
                        help="peak GPU memory of unfrozen training steps with and without "
                             "--grad-checkpointing, ViT-B/16 and ViT-L/16, at each e2e batch "
                             "(--e2e-batch-sizes, else --e2e-batch-size; CUDA only)")
    parser.add_argument("--backbone-batches", default=None, metavar="B,B",
                        help="time the frozen backbone's forward pass (--model-name) at these "
                             "batches, as --frozen-batch would run it")
    parser.add_argument("--backbone-images", type=int, default=128,
                        help="images timed per batch size of --backbone-batches")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: known for H100, "
                             "H200 and A100 at bf16; else MFU is left out)")
    parser.add_argument("--e2e-projection", action="store_true",
                        help="also run device_data's loaders + our model in the benchmark's loop")


def add_data_and_output_flags(parser: argparse.ArgumentParser) -> None:
    """The loaders' workers, the stand-in, the time budget and the files written."""
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers of --data and --e2e")
    parser.add_argument("--standin", default=None,
                        help="stand-in folder to make or reuse (default: a temporary one)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no memory, e2e or cache run after this many seconds from "
                             "the start, most wanted runs first; those not started are named "
                             "in a note (a run already going finishes: leave room for the "
                             "longest under a hard limit)")
    parser.add_argument("--json", default=None,
                        help="also write the results here, after every whole run")
    parser.add_argument("--train-log", default=None,
                        help="train.py's output from --e2e and --e2e-cache (default: next to "
                             "--json, else a temporary file)")


def range_problems(args: argparse.Namespace) -> list[str]:
    """What is out of range among the flags, each as one sentence."""
    def too_small(flag: str, low: int) -> list[str]:
        value = getattr(args, flag[2:].replace("-", "_"))
        return [] if value is None or value >= low else [
            f"{flag} must be at least {low}, got {value}."]

    problems = [problem for flag, low in (
        ("--batch-size", 1), ("--infer-batch-size", 1), ("--steps", 1), ("--warmup", 0),
        ("--repeats", 1), ("--img-size", 1), ("--e2e-epochs", 1), ("--e2e-batch-size", 1),
        ("--workers", 0), ("--backbone-images", 1)) for problem in too_small(flag, low)]
    for flag, text in (("--e2e-batch-sizes", args.e2e_batch_sizes),
                       ("--backbone-batches", args.backbone_batches)):
        numbers = [b.strip() for b in (text or "").split(",") if b.strip()]
        if text is not None and not (numbers and all(b.isdigit() and int(b) >= 1
                                                     for b in numbers)):
            problems.append(f"{flag} must be batch sizes of at least 1 separated by commas, "
                            f"got {text!r}.")
    for flag, text, allowed in (("--e2e-modes", args.e2e_modes, E2E_MODES),
                                ("--models", args.models, PEERS)):
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or not set(names) <= set(allowed):
            problems.append(f"{flag} must name some of {', '.join(allowed)}, got {text!r}.")
    if not (math.isfinite(args.e2e_scale) and args.e2e_scale > 0):
        problems.append(f"--e2e-scale must be a positive fraction, got {args.e2e_scale}.")
    for flag, value in (("--peak-tflops", args.peak_tflops),
                        ("--time-budget", args.time_budget)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            problems.append(f"{flag} must be a number of 0 or more, got {value}.")
    return problems


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    defaults = dict(dtype="bf16" if cuda else "fp32", batch_size=128 if cuda else 4,
                    infer_batch_size=256 if cuda else 8, steps=20 if cuda else 2,
                    warmup=10 if cuda else 1, repeats=3 if cuda else 1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def run_header(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> dict:
    """What the numbers were measured on and with; printed first, kept in the JSON."""
    command = "python benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = {"device": device_name(device), **versions(), "dtype": args.dtype,
              "batch_size": args.batch_size, "infer_batch_size": args.infer_batch_size,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "command": command}
    print(" | ".join(f"{k} {v}" for k, v in header.items() if k != "command"))
    print(command)
    return header


def prepare_standin(args: argparse.Namespace, stack: contextlib.ExitStack, results: dict) -> Path:
    """The JPEG stand-in for flower_photos: in --standin, else a temporary folder."""
    if args.standin:
        root = Path(args.standin)
    else:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="standin-")))
    start = time.perf_counter()
    make_standin(root, args.e2e_scale, workers=os.cpu_count())
    files = sorted(root.glob("*/*.jpg"))
    kib = sum(p.stat().st_size for p in files) / max(len(files), 1) / 1024
    print(f"\nStand-in: {len(files)} JPEGs in {root}, {kib:.1f} KiB on average "
          f"({time.perf_counter() - start:.1f} s)")
    results["standin"] = {"images": len(files), "mean_kib": kib, "path": str(root)}
    return root


def checked_device(args: argparse.Namespace) -> torch.device:
    """The device to measure on, once every flag is known to be in range."""
    problems = range_problems(args)
    if problems:
        raise UserError(problems[0])
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device} is not a device; pass cuda, cuda:N or "
                        "cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; pass --device cpu.")
    return device


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    device = checked_device(args)
    fill_defaults(args, device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]
    json_path = output_file(args.json, "--json")
    train_log = output_file(args.train_log, "--train-log")
    results: dict = {"header": run_header(args, device, argv), "notes": []}
    notes: list[str] = results["notes"]
    progress = Progress(results, json_path, args.time_budget)
    progress.save()  # an unwritable --json fails here, before anything is measured
    failed = False

    def section(name: str, run: Callable[[], list[dict]]) -> None:
        """Run one section; a crash becomes a note, and the JSON is rewritten after each."""
        nonlocal failed
        try:
            results[name] = run()
        except Exception as err:  # keep what the other sections measured
            failed = True
            notes.append(f"the {name} section failed: {type(err).__name__}: {err}")
            traceback.print_exc()
        progress.save()

    with contextlib.ExitStack() as stack:
        root = None
        if args.data or args.e2e or args.e2e_cache:
            root = prepare_standin(args, stack, results)
        if device.type == "cuda":
            # After the stand-in: its worker processes are forked without a CUDA context.
            torch.backends.cudnn.benchmark = True
            torch.ones(1, device=device).sum().item()  # CUDA context before any timing

        if args.model:
            print(f"\nModel ({args.model_name}, {args.dtype}, train batch {args.batch_size}, "
                  f"inference batch {args.infer_batch_size}, {args.steps} steps x "
                  f"{args.repeats}, images/s):", flush=True)
            section("model", lambda: model_section(args, device, dtype))
        if args.profile:
            print(f"\nStep anatomy ({args.model_name}, SGD, batch {args.batch_size}, "
                  f"{args.dtype}):", flush=True)
            section("profile", lambda: profile_section(args, device, dtype))
        if args.backbone_batches:
            print(f"\nFrozen backbone, forward pass by batch ({args.model_name}, "
                  f"{args.dtype}):", flush=True)
            section("backbone_batches", lambda: backbone_batch_section(args, device, dtype))
        if args.data:
            print(f"\nData ({args.img_size} px, one training epoch over the stand-in's "
                  f"training split):", flush=True)
            section("data", lambda: data_section(args, device, root))
        if args.memory:  # before the whole runs: seconds, where a time budget cuts from the end
            print(f"\nPeak memory, unfrozen SGD steps, {args.dtype}:", flush=True)
            section("memory", lambda: memory_section(args, device, dtype, notes, progress))
        if args.e2e or args.e2e_cache:
            log = train_log or (json_path.with_suffix(".train.log") if json_path else Path(
                stack.enter_context(tempfile.TemporaryDirectory())) / "train.log")
            with writing(log):
                log.write_text("")
            if args.e2e:
                print(f"\nEnd to end ({args.e2e_model}, batch "
                      f"{','.join(map(str, e2e_batch_sizes(args)))}, {args.e2e_epochs} epochs, "
                      f"{args.workers} workers, {args.dtype}; speed-up = reference seconds / "
                      f"these; train.py output in {log}):", flush=True)
                section("e2e", lambda: e2e_section(args, device, dtype, root, log, notes,
                                                   progress))
            if args.e2e_cache:
                print(f"\nFrozen, --no-augment ({args.e2e_model}, {args.e2e_epochs} epochs; "
                      f"speed-up = the per-batch run's seconds / these):", flush=True)
                section("cache", lambda: cache_section(args, device, dtype, root, log, notes,
                                                       progress))
    return finish(args, progress, failed)


def finish(args: argparse.Namespace, progress: Progress, failed: bool) -> int:
    """The notes (each once, the runs --time-budget left out among them), the last save, and
    the exit status: 1 if a section or a whole run failed."""
    results = progress.results
    if progress.not_started:
        results["not_started"] = progress.not_started
        results["notes"].append(
            f"--time-budget {args.time_budget:g} s ran out before {len(progress.not_started)} "
            f"runs: {'; '.join(progress.not_started)}.")
    results["notes"] = list(dict.fromkeys(results["notes"]))
    for note in results["notes"]:
        print(f"note: {note}")
    progress.save()
    if progress.json_path:
        print(f"Results written to {progress.json_path}")
    failed = failed or not all(r.get("ok", True)
                               for r in results.get("e2e", []) + results.get("cache", []))
    return 1 if failed else 0


def output_file(path: str | None, flag: str) -> Path | None:
    """A file the benchmark writes, its folder made, checked before any measuring."""
    if not path:
        return None
    path = check_output_file(path, flag)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_main(functools.partial(run, argv=argv), args)


class Terminated(BaseException):
    """SIGTERM (what `timeout` sends): not an Exception, so no run's error handling keeps
    the benchmark going; the temporary folders are removed on the way out."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    try:
        status = main()
    except Terminated:
        print("\nTerminated; the JSON holds every run that ended.", file=sys.stderr)
        status = TERMINATED_STATUS
    raise SystemExit(status)
