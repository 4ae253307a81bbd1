"""Fine-tune a ViT on a folder of images (one sub-folder per class), as the report does.

    python train.py --freeze-layers            # the report's run 1: in21k weights, head only
    python train.py --no-freeze-layers         # run 2: the whole network
    python train.py --weights '' --no-freeze-layers --epochs 48   # run 3: from scratch
    python train.py --demo                     # offline: synthetic flowers, a small ViT, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # before torch's seconds-long import: Ctrl-C then exits 130 quietly
    from cli import quiet_ctrl_c_while_importing

    quiet_ctrl_c_while_importing()

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import (
    BEST_FILE,
    CLASS_INDICES_FILE,
    DEFAULT_OUTPUT_DIR,
    EPOCH_FILES,
    INTERRUPTED_FILE,
    Checkpoint,
    CheckpointWriter,
    epoch_checkpoints,
    epoch_file,
    load_resumable,
    lock_run_folder,
    make_checkpoint,
    newest_epoch_checkpoint,
    paths_in_the_way,
    prune_checkpoints,
    read_resumable,
    read_train_args,
    remove_temporary_files,
    restore_best,
    restore_training_state,
    run_files,
    save_checkpoint,
    training_state,
)
from cli import (
    INTERRUPTED_STATUS,
    TERMINATED_STATUS,
    add_device_flag,
    add_model_name_flag,
    run_main,
)
from cuda_graphs import CudaGraphModel, use_cuda_graphs
from demo_data import make_demo_flowers
from distributed import Distributed, ShardSampler, barrier, init_distributed, shut_down
from download import FLOWERS_DIR, WEIGHTS_FILE
from errors import (
    ProjectError,
    UserError,
    WeightsError,
    WriteError,
    check_output_dir,
    make_output_dir,
    writing,
)
from frozen_features import FrozenHeadTraining, plan_frozen_head
from my_dataset import MyDataSet, SeededSamples, build_transforms, unnormalize
from utils import (
    DEFAULT_SEED,
    DEFAULT_VAL_RATE,
    EpochStats,
    FeatureCache,
    Split,
    StepSettings,
    evaluate,
    lr_lambda,
    read_split_data,
    seed_problem,
    select_device,
    train_one_epoch,
    write_class_indices,
)
from visualize import (
    attention_rollout,
    figure_pixels,
    plot_confusion_matrix,
    plot_prediction_grid,
)
from vit_model import VisionTransformer, create_model
from weights import build_model_for, fit_state_dict, read_weights

DEFAULT_WEIGHTS = f"./{WEIGHTS_FILE}"
DEMO_DATA = Path("demo_data") / FLOWERS_DIR
# What --demo changes, unless the flag is given: a model and schedule that learn the
# synthetic flowers from scratch in about a minute on two CPU cores.
DEMO_SETTINGS = dict(data_path=str(DEMO_DATA), model_name="vit_demo_patch8_64", weights="",
                     freeze_layers=False, batch_size=16, lr=0.05, device="cpu")
ATTENTION_IMAGES = 4  # validation images whose attention rollout TensorBoard shows each epoch
DEFAULT_LOG_DIR = "runs"  # --log-dir; None there means not given (a resumed run keeps its own)


def str_to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a Vision Transformer on a folder of images.")
    parser.add_argument("--num-classes", "--num_classes", type=int, default=None,
                        help="number of classes (default: the number of class folders)")
    parser.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=0.001, help="default: %(default)s")
    parser.add_argument("--lrf", type=float, default=0.01,
                        help="final learning rate as a fraction of --lr (cosine schedule; "
                             "default: %(default)s)")
    parser.add_argument("--data-path", default=f"./{FLOWERS_DIR}",
                        help="folder with one sub-folder of images per class "
                             "(default: %(default)s)")
    add_model_name_flag(parser, "architecture")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="pretrained weights to start from, any format weights.py reads; "
                             "'' trains from scratch (default: %(default)s)")
    # The report's flag was type=bool, so "--freeze-layers False" was True. Here
    # --no-freeze-layers and --freeze-layers false|0|no all turn it off.
    parser.add_argument("--freeze-layers", nargs="?", const=True, default=True,
                        type=str_to_bool, metavar="BOOL",
                        help="train only the head (and pre-logits); the default. "
                             "--no-freeze-layers or --freeze-layers false trains everything")
    parser.add_argument("--no-freeze-layers", dest="freeze_layers", action="store_false",
                        help=argparse.SUPPRESS)
    add_device_flag(parser)
    parser.add_argument("--output-dir", default=f"./{DEFAULT_OUTPUT_DIR}",
                        help="where checkpoints and class_indices.json go (default: %(default)s)")
    parser.add_argument("--log-dir", default=None,
                        help=f"TensorBoard log folder; each run gets a dated sub-folder "
                             f"(default: {DEFAULT_LOG_DIR}). A resumed run goes on in its own "
                             f"sub-folder, or in one of that name here when --log-dir is given")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size in pixels (default: the model's, 224); pretrained "
                             "position embeddings are resampled to fit")
    parser.add_argument("--val-rate", type=float, default=DEFAULT_VAL_RATE,
                        help="fraction of each class held out for validation (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the split and the run, below 2**32 (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: the cores this process may use, "
                             "shared among torchrun's processes, at most 16)")
    parser.add_argument("--download", action="store_true",
                        help="fetch flower_photos and the in21k weights first, where missing")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: generate synthetic flowers and train a small ViT")

    add_speed_options(parser)
    add_run_options(parser)
    add_recipe_options(parser)
    return parser


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed (each on where it helps; --no-X turns it off)")
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision: bfloat16 where the GPU has it, else float16 with "
                            "a gradient scaler (default: on for CUDA)")
    speed.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls for the float32 parts on CUDA")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (pays off on long runs: compiling "
                            "takes about a minute); with CUDA graphs, the graphs are "
                            "captured around the compiled model")
    speed.add_argument("--device-data", action=argparse.BooleanOptionalAction, default=None,
                       help="decode every image once on the GPU and augment there, instead of "
                            "decoding JPEGs on the CPU every epoch (default: on for CUDA)")
    speed.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each training step's forward and backward as CUDA graphs: "
                            "small batches stop waiting on Python's kernel launches (default: "
                            "on for one CUDA process, with or without --compile)")
    speed.add_argument("--val-batch-size", type=int, default=None,
                       help="validation batch (default: 2x --batch-size; no gradients to hold)")
    speed.add_argument("--cache-val-features", action=argparse.BooleanOptionalAction,
                       default=True, help="with a frozen backbone, compute the validation "
                                          "features once and run only the head afterwards")
    speed.add_argument("--frozen-batch", type=int, default=0, metavar="N",
                       help="with a frozen backbone, run it over N images' worth of training "
                            "batches at once, then take the head's steps in --batch-size "
                            "batches (the same updates). Default 0, one backbone pass per "
                            "batch: grouping measured no faster on a CPU; on the GPU, CUDA "
                            "graphs take precedence")
    speed.add_argument("--cache-train-features", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="with a frozen backbone and --no-augment, compute the training "
                            "features once and train only the head on them every epoch. "
                            "Needs --no-augment, which changes the report's recipe (no random "
                            "crops or flips)")
    speed.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="recompute each block's activations in the backward pass: less "
                            "memory for about one more forward pass per step")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    runs = parser.add_argument_group("never lose a run")
    runs.add_argument("--resume", default=None, metavar="CKPT",
                      help="continue from a model-*.pth; 'auto' takes the newest in "
                           "--output-dir (and starts fresh in a folder with no checkpoint at "
                           "all). Give the "
                           "command of the run: another --freeze-layers or --opt is refused; "
                           "the model, --img-size, --drop-path, --lr, --momentum and --wd "
                           "are the checkpoint's (a note says when they differ)")
    runs.add_argument("--keep", type=int, default=None, metavar="N",
                      help="keep only the newest N epoch checkpoints besides best.pth "
                           "(default: all, as the report)")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    recipe = parser.add_argument_group("the paper's recipe, as options (defaults: the report's)")
    recipe.add_argument("--opt", choices=("sgd", "adamw"), default="sgd",
                        help="default: %(default)s")
    recipe.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum (default: %(default)s)")
    recipe.add_argument("--wd", type=float, default=5e-5,
                        help="weight decay (default: %(default)s)")
    recipe.add_argument("--warmup-epochs", type=int, default=0,
                        help="linear warm-up epochs before the cosine decay")
    recipe.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                        help="clip the global gradient norm (the paper: 1)")
    recipe.add_argument("--label-smoothing", type=float, default=0.0,
                        help="default: %(default)s")
    recipe.add_argument("--accum-steps", type=int, default=1,
                        help="accumulate gradients over N batches (the paper's batch is 512)")
    recipe.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    recipe.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random crops and flips for training (--no-augment: the "
                             "evaluation transform only)")
    recipe.add_argument("--exif-transpose", action=argparse.BooleanOptionalAction, default=False,
                        help="turn photos upright by their EXIF orientation, as predict.py and "
                             "evaluate.py do (default: off, as the reproduced repository)")


def log_root(args: argparse.Namespace) -> str:
    """--log-dir, or its default where it was not given."""
    return DEFAULT_LOG_DIR if args.log_dir is None else args.log_dir


def given_options(argv: list[str] | None) -> set[str]:
    """The options typed on the command line, even those typed at their default value."""
    probe = get_args_parser()
    for action in probe._actions:  # parse again with no defaults: only what was typed stays
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_demo_settings(args: argparse.Namespace, given: set[str]) -> None:
    """--demo changes the settings the user did not give, and makes the data."""
    for name, value in DEMO_SETTINGS.items():
        if name not in given:
            setattr(args, name, value)
    check_args(args)  # a wrong flag stops the run before the demo data is written
    if Path(args.data_path) == DEMO_DATA:
        print(f"Demo: writing synthetic flower images to {DEMO_DATA} (not real photographs).")
        make_demo_flowers(DEMO_DATA)


# --------------------------------------------------------------------------- the run

def train(args: argparse.Namespace) -> int:
    """The run, stage by stage; each stage is a function below, in this order."""
    check_args(args)
    setup = set_up(args)
    split = read_data(args, setup)
    with claim_output_dir(args, setup):
        resume = read_resume(args, setup.log)
        model = build_or_resume_model(args, split, resume, setup)
        train_loader, val_loader = build_loaders(args, split, model, setup)
        optimisation = build_optimisation(args, model, setup, resumed=resume is not None)
        progress = start_or_resume(args, resume, optimisation, setup.log)
        del resume  # its tensors are in the model and the optimizer now; free the copies
        wrappers = wrap_for_training(model, args, setup, optimisation.settings)
        wrappers.frozen_head = choose_training_paths(args, model, setup, wrappers)
        capture_cuda_graphs(wrappers, args.batch_size, setup.device)
        outputs = RunOutputs(args, split, progress.log_dir) if setup.dist_info.is_main else None
        return run_epochs(args, setup, split, wrappers, (train_loader, val_loader),
                          optimisation, progress, outputs)


# --------------------------------------------------------------------------- set-up

@dataclass
class Setup:
    """Where this process runs and whether it speaks: only rank 0 prints."""

    device: torch.device
    dist_info: Distributed
    log: Callable[..., None]


# Inputs larger than this are a typo (a ViT-B/16 at 4096 px has 65536 patches per image).
MAX_IMG_SIZE = 4096


def check_args(args: argparse.Namespace) -> None:
    """Every flag's range, before anything is read or written: one line for the first wrong."""
    problems = range_problems(args)
    if problems:
        raise UserError(problems[0])
    if args.img_size is not None:
        # depth 0 and one class: only the patch size is wanted, not a whole model
        patch = create_model(args.model_name, depth=0, num_classes=1).patch_embed.patch_size[0]
        if args.img_size % patch:
            nearest = max(patch, round(args.img_size / patch) * patch)
            raise UserError(f"--img-size {args.img_size} is not a multiple of "
                            f"{args.model_name}'s {patch} px patches; try {nearest}.")
    data = Path(args.data_path).resolve()
    for flag, folder in (("--output-dir", args.output_dir), ("--log-dir", log_root(args))):
        if not folder:
            raise UserError(f"{flag} is empty; name a folder ('.' for this one).")
        in_the_way = next((p for p in (Path(folder), *Path(folder).parents)
                           if p.exists() and not p.is_dir()), None)
        if in_the_way is not None:
            raise UserError(f"{flag} {folder}: {in_the_way} is a file, not a folder; pass "
                            f"another {flag}.")
        check_output_dir(folder, flag)  # a read-only folder, or one that is not ours
        if data.is_dir() and Path(folder).resolve().is_relative_to(data):
            raise UserError(f"{flag} {folder} is inside --data-path {args.data_path}, where "
                            f"every folder is a class; pass a folder outside it.")
    in_the_way = paths_in_the_way(args.output_dir)
    if in_the_way:  # else the run would fail writing there, maybe epochs later
        raise UserError(f"--output-dir {args.output_dir}: {in_the_way[0]} is not a file but "
                        f"stands where the run writes one; move it away or pass another "
                        f"--output-dir.")
    earlier_demo_run(args)  # refuses an --output-dir that holds another run


def earlier_demo_run(args: argparse.Namespace) -> list[Path]:
    """The checkpoints of an earlier --demo run in --output-dir, which this run replaces.

    Any other run there is refused (UserError), unless this run continues it (--resume auto,
    or --resume from a checkpoint in that folder): a new run would replace best.pth and its
    own epochs' checkpoints and leave the rest, and a later --resume auto would continue the
    old run. A demo run is the exception because it is a toy, remade in a minute: `python
    train.py --demo` twice, or the demo and then a real run, both write into ./weights.
    --resume auto is refused too where the folder holds best.pth but no epoch checkpoint: it
    would start afresh and replace it. interrupted.pth alone (a run stopped in its first
    epoch) is no reason: there is nothing complete to continue from, so it starts again.
    """
    output_dir = Path(args.output_dir)
    found, epochs = run_files(output_dir), epoch_checkpoints(output_dir)
    if args.resume == "auto":
        best = output_dir / BEST_FILE
        if best in found and not epochs:  # "no checkpoint; starting fresh" would replace it
            raise UserError(f"--resume auto: --output-dir {output_dir} holds {BEST_FILE} "
                            f"but no {EPOCH_FILES} to continue from; pass another --output-dir "
                            f"to start a new run (--weights {best} fine-tunes from it).")
        return []
    if args.resume and Path(args.resume).resolve().parent == output_dir.resolve():
        return []
    if all(read_train_args(path).get("demo") is True for path in found):
        return found
    names = [path.name for path in found if path.name in (BEST_FILE, INTERRUPTED_FILE)]
    if epochs:
        first, last = epochs[0][1].name, epochs[-1][1].name
        names.append(first if len(epochs) == 1 else f"{first} ... {last}")
    continue_it = "continue it with --resume auto, or " if epochs else ""
    raise UserError(f"--output-dir {output_dir} already holds a training run "
                    f"({', '.join(names)}); {continue_it}pass another --output-dir to start a "
                    f"new one.")


def range_problems(args: argparse.Namespace) -> list[str]:
    """What is out of range among the numeric flags, each as one sentence."""
    def finite(value: float | None) -> bool:
        return value is None or math.isfinite(value)

    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}."),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}."),
        (args.accum_steps >= 1, f"--accum-steps must be at least 1, got {args.accum_steps}."),
        (args.val_batch_size is None or args.val_batch_size >= 1,
         f"--val-batch-size must be at least 1, got {args.val_batch_size}."),
        (args.workers is None or args.workers >= 0,
         f"--workers must be 0 or more, got {args.workers}."),
        (args.frozen_batch >= 0, f"--frozen-batch must be 0 or more, got {args.frozen_batch}."),
        (args.num_classes is None or args.num_classes >= 1,
         f"--num-classes must be at least 1, got {args.num_classes}."),
        (args.keep is None or args.keep >= 1,
         f"--keep must be at least 1 (the newest epoch checkpoint is what --resume continues "
         f"from), got {args.keep}."),
        (finite(args.lr) and args.lr > 0, f"--lr must be a positive number, got {args.lr}."),
        # Above 1 the schedule rises instead of decaying; allowed, but never negative.
        (finite(args.lrf) and args.lrf >= 0, f"--lrf must be 0 or more, got {args.lrf}."),
        (finite(args.momentum) and 0 <= args.momentum < 1,
         f"--momentum must be in [0, 1), got {args.momentum}."),
        (finite(args.wd) and args.wd >= 0, f"--wd must be 0 or more, got {args.wd}."),
        (0 <= args.warmup_epochs < args.epochs,
         f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs} with --epochs "
         f"{args.epochs}."),
        (args.clip_grad is None or (finite(args.clip_grad) and args.clip_grad > 0),
         f"--clip-grad must be a positive norm, got {args.clip_grad}."),
        (finite(args.label_smoothing) and 0 <= args.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), got {args.label_smoothing}."),
        (finite(args.drop_path) and 0 <= args.drop_path < 1,
         f"--drop-path must be in [0, 1), got {args.drop_path}."),
        (finite(args.val_rate) and 0 < args.val_rate < 1,
         f"--val-rate must be between 0 and 1, got {args.val_rate}."),
        (args.img_size is None or 1 <= args.img_size <= MAX_IMG_SIZE,
         f"--img-size must be between 1 and {MAX_IMG_SIZE} pixels, got {args.img_size}."),
        (seed_problem(args.seed) is None, seed_problem(args.seed)),
    ]
    return [message for ok, message in checks if not ok]


def set_up(args: argparse.Namespace) -> Setup:
    """The device, the torchrun group, --download, the CUDA switches and the seed."""
    device = select_device(args.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    log = print if dist_info.is_main else (lambda *a, **k: None)
    if args.download:
        if dist_info.is_main:
            fetch_missing(args, log)
        barrier(dist_info)  # the other ranks wait for rank 0's download
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv once
        # Both ways: the switches belong to the process, and cuDNN's is on by default.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    return Setup(device, dist_info, log)


def fetch_missing(args: argparse.Namespace, log=print) -> None:
    """--download: get flower_photos and the weights where the paths name them but hold nothing."""
    import download  # the URLs are read here, at call time, so a mirror can be set

    data = Path(args.data_path)
    if not data.exists():
        if data.name != FLOWERS_DIR:
            raise UserError(f"--download fetches flower_photos; {data} names another folder.")
        data.parent.mkdir(parents=True, exist_ok=True)
        log(f"Downloading flower_photos to {data} ...")
        download.download_flowers(data.parent, download.FLOWERS_URL,
                                  download.FLOWER_CLASS_COUNTS)
    if args.weights and not Path(args.weights).exists():
        fmt = "npz" if args.weights.endswith(".npz") else "pth"
        log(f"Downloading the ImageNet-21k ViT-B/16 weights to {args.weights} ...")
        download.download_weights(fmt, Path(args.weights), download.WEIGHTS[fmt].url)


# --------------------------------------------------------------------------- data

def read_data(args: argparse.Namespace, setup: Setup) -> Split:
    """The split of --data-path, with the counts printed and the classes checked."""
    log = setup.log
    split = read_split_data(args.data_path, args.val_rate, args.seed, warn=log)
    log(f"{split.num_images} images were found in the dataset.")
    log(f"{len(split.train_images)} images for training.")
    log(f"{len(split.val_images)} images for validation.")
    if split.skipped:
        log(f"{len(split.skipped)} unreadable files were skipped.")
    if not split.train_images or not split.val_images:
        raise UserError(f"{args.data_path} gives {len(split.train_images)} training and "
                        f"{len(split.val_images)} validation images; both need at least one "
                        f"(add images or change --val-rate).")
    num_classes = len(split.class_names)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.data_path} has "
                        f"{num_classes} class folders ({', '.join(split.class_names)}).")
    return split


# --------------------------------------------------------------------------- the output folder

@contextlib.contextmanager
def claim_output_dir(args: argparse.Namespace, setup: Setup) -> Iterator[None]:
    """Make the output and log folders and hold the output folder while the run lasts.

    Rank 0 holds it: a second run into the same folder is refused, and the temporary files
    of a write that was killed midway are removed.
    """
    if not setup.dist_info.is_main:
        yield
        return
    folders = {"--output-dir": Path(args.output_dir), "--log-dir": Path(log_root(args))}
    created = [folder for folder in folders.values() if not folder.exists()]
    try:
        for flag, folder in folders.items():
            make_output_dir(folder, flag)
    except ProjectError:  # the log folder failed after the output folder was made
        leave_no_trace(created)
        raise
    try:
        with lock_run_folder(args.output_dir):
            for path in remove_temporary_files(args.output_dir):
                setup.log(f"note: removed {path}, left by a write that was interrupted.")
            replace_demo_run(args, setup.log)
            # Before this run prunes anything: a run killed between writing its best epoch's
            # checkpoint and best.pth left the best weights in that checkpoint only.
            rebuilt_from = restore_best(args.output_dir)
            if rebuilt_from is not None:
                setup.log(f"note: {Path(args.output_dir) / BEST_FILE} was missing or older than "
                          f"the best epoch; copied {rebuilt_from} to it.")
            yield
    except (ProjectError, KeyboardInterrupt):
        leave_no_trace(created)  # once the lock's file is gone with the lock
        raise


def replace_demo_run(args: argparse.Namespace, log=print) -> None:
    """Delete the checkpoints of an earlier --demo run in the output folder (earlier_demo_run),
    so that none of them is taken for this run's; asked again under the lock."""
    found = earlier_demo_run(args)
    for path in found:
        with writing(path):
            path.unlink()
    if found:
        log(f"note: replaced the earlier --demo run in {args.output_dir} (its {len(found)} "
            f"checkpoints are deleted).")


def leave_no_trace(created: list[Path]) -> None:
    """A run refused before it wrote anything leaves no empty folders behind."""
    with contextlib.suppress(OSError):
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


# --------------------------------------------------------------------------- model and resume

def read_resume(args: argparse.Namespace, log=print) -> Checkpoint | None:
    """The checkpoint --resume continues from, or None to start fresh."""
    if not args.resume:
        return None
    if args.resume == "auto":
        path, checkpoint = newest_readable_checkpoint(args.output_dir, log)
        if path is None:
            log(f"--resume auto: no checkpoint in {args.output_dir}; starting fresh.")
            return None
    else:
        path = Path(args.resume)
        if path.is_dir():
            raise UserError(f"--resume {path} is a folder; pass one of its {EPOCH_FILES}, or "
                            f"--resume auto --output-dir {path}.")
        if not path.is_file():
            raise UserError(f"--resume {path}: no such checkpoint.")
        checkpoint = load_resumable(path)
    check_same_run(args, checkpoint, path, log)
    log(f"Resuming from {path} (epoch {checkpoint.epoch} done).")
    if checkpoint.epoch + 1 >= args.epochs:
        log(f"note: that is the last of --epochs {args.epochs}; nothing more to train (raise "
            f"--epochs to train on).")
    return checkpoint


def newest_readable_checkpoint(folder: str, log=print
                               ) -> tuple[Path | None, Checkpoint | None]:
    """--resume auto: the newest epoch checkpoint that loads; a damaged one is passed over
    (and overwritten when the run gets to its epoch again)."""
    found = epoch_checkpoints(folder)
    for _, path in reversed(found):
        checkpoint, (why_not, _) = read_resumable(path)
        if checkpoint is not None:
            return path, checkpoint
        log(f"note: --resume auto is passing over {path}, which {why_not}; the run goes on "
            f"from the newest epoch checkpoint that loads.")
    if found:
        raise UserError(f"--resume auto: none of the {len(found)} epoch checkpoints in {folder} "
                        f"can be read; pass another --output-dir to start a new run.")
    return None, None


# What a resumed run cannot change: the optimizer state holds what these chose (which
# parameters train, and which optimizer's moments).
FIXED_ON_RESUME = ("freeze_layers", "opt")
# What a resumed run takes from the checkpoint, whatever the command says: the model is
# rebuilt from the file, and the optimizer's state carries its rate, momentum and decay.
TAKEN_FROM_CHECKPOINT = ("model_name", "img_size", "drop_path", "lr", "momentum", "wd")


def check_same_run(args: argparse.Namespace, checkpoint: Checkpoint, path: Path,
                   log=print) -> None:
    """Refuse a flag that changes FIXED_ON_RESUME; note those TAKEN_FROM_CHECKPOINT."""
    def flag(name: str, value) -> str:
        dashed = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return dashed if value else dashed.replace("--", "--no-", 1)
        return f"{dashed} {value}"

    saved = checkpoint.args
    for name in FIXED_ON_RESUME:
        if name in saved and saved[name] != getattr(args, name):
            raise UserError(f"--resume: {path} was trained with {flag(name, saved[name])}, the "
                            f"command says {flag(name, getattr(args, name))}; use "
                            f"{flag(name, saved[name])} to continue that run, or another "
                            f"--output-dir for a new one.")
    differ = [flag(name, saved[name]) for name in TAKEN_FROM_CHECKPOINT
              if name in saved and saved[name] != getattr(args, name)]
    if differ:
        log(f"note: the resumed run keeps its {', '.join(differ)}; the command's values for "
            f"these are not used.")


def build_or_resume_model(args: argparse.Namespace, split: Split, resume: Checkpoint | None,
                          setup: Setup) -> VisionTransformer:
    """The plain model on the device: the resumed checkpoint's, or a new one (build_model)."""
    if resume is None:
        model = build_model(args, len(split.class_names), setup.log)
    elif resume.class_names != split.class_names:
        raise UserError(f"--resume: the checkpoint's classes {resume.class_names} "
                        f"differ from {args.data_path}'s {split.class_names}.")
    else:
        model = VisionTransformer(**resume.model_args)
        model.load_state_dict(resume.model)
    return model.to(setup.device)


def build_model(args: argparse.Namespace, num_classes: int, log=print) -> VisionTransformer:
    """The model to fine-tune, with the pretrained weights loaded when --weights is given."""
    overrides = dict(num_classes=num_classes, has_logits=False)
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.drop_path:
        overrides["drop_path_rate"] = args.drop_path
    if args.weights and not Path(args.weights).exists():  # a Hugging Face folder is fine too
        raise UserError(f"Weights file {args.weights} not found: download it with "
                        f"'python download.py weights' (or add --download), or pass "
                        f"--weights '' to train from scratch.")
    try:
        weights = read_weights(args.weights) if args.weights else None
    except OSError as err:  # unreadable (permissions, an I/O error), not malformed
        raise WeightsError(f"--weights {args.weights} cannot be read "
                           f"({err.strerror or err}).") from None
    try:
        if weights is None:
            return create_model(args.model_name, **overrides)
        model = build_model_for(weights, args.model_name, fine_tune=overrides)
    except ValueError as err:  # PatchEmbed: the image is not a whole number of patches
        if args.img_size is None:
            raise
        raise UserError(f"--img-size {args.img_size} does not fit {args.model_name}: "
                        f"{err}") from None
    state_dict, report = fit_state_dict(model, weights.state_dict)
    model.load_state_dict(state_dict, strict=False)
    log(f"Weights {args.weights} ({weights.format}): {report}")
    return model


def default_workers(dist_info: Distributed) -> int:
    """All the cores this process may use, shared among the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    return min(max((cores or 1) // local_world, 1), 16)


def build_loaders(args: argparse.Namespace, split: Split, model: VisionTransformer,
                  setup: Setup):
    """The training and validation batches, at the model's input size."""
    workers = default_workers(setup.dist_info) if args.workers is None else args.workers
    # One process per training batch at most: more would only start and wait.
    workers = min(workers, math.ceil(len(split.train_images) / args.batch_size))
    setup.log(f"Using {workers} dataloader workers every process")
    return build_dataloaders(split, args, model.image_size, workers, setup.device,
                             setup.dist_info, setup.log)


def build_dataloaders(split: Split, args: argparse.Namespace, img_size: int, workers: int,
                      device: torch.device, dist_info: Distributed, log=print):
    """Batches for training and validation: on the device when it pays, else a DataLoader."""
    use_device_data = device.type == "cuda" if args.device_data is None else args.device_data
    if use_device_data and not args.augment:
        log("note: --no-augment uses the CPU DataLoader; --device-data is off.")
        use_device_data = False
    if use_device_data and args.exif_transpose:
        # device_data decodes JPEG bytes as stored (and sizes them so): it would not turn them.
        log("note: --exif-transpose uses the CPU DataLoader; --device-data is off.")
        use_device_data = False
    if use_device_data:
        from device_data import DeviceEvalLoader, DeviceMemoryError, DeviceTrainLoader

        common = dict(img_size=img_size, device=device, rank=dist_info.rank,
                      world_size=dist_info.world_size, workers=workers or None)
        try:
            loaders = (
                DeviceTrainLoader.from_files(split.train_images, split.train_labels,
                                             seed=args.seed, batch_size=args.batch_size,
                                             **common),
                DeviceEvalLoader.from_files(split.val_images, split.val_labels,
                                            batch_size=args.val_batch_size or 2 * args.batch_size,
                                            **common))
            log(f"Images decoded once and kept on {device}.")
            return loaders
        except DeviceMemoryError as err:
            log(f"note: {err} Falling back to the CPU DataLoader.")
    train_set = MyDataSet(split.train_images, split.train_labels,
                          build_transforms(img_size, train=args.augment),
                          exif_transpose=args.exif_transpose)
    val_set = MyDataSet(split.val_images, split.val_labels, build_transforms(img_size, False),
                        exif_transpose=args.exif_transpose)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    if args.augment:
        train_set = SeededSamples(train_set)  # the same crops whatever --workers, and resumed
    train_sampler = ShardSampler(len(train_set), shuffle=True, seed=args.seed, dist_info=dist_info,
                                 sample_seeds=args.augment)
    val_sampler = ShardSampler(len(val_set), shuffle=False, dist_info=dist_info)
    return (DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, **common),
            DataLoader(val_set, batch_size=args.val_batch_size or 2 * args.batch_size,
                       sampler=val_sampler, **common))


# --------------------------------------------------------------------------- optimisation

@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    settings: StepSettings  # precision (and float16's scaler), accumulation, clipping, loss


def build_optimisation(args: argparse.Namespace, model: VisionTransformer, setup: Setup,
                       resumed: bool) -> Optimisation:
    """What trains (--freeze-layers), the optimizer, the schedule and the precision."""
    log = setup.log
    if args.freeze_layers:
        if not args.weights and not resumed:
            log("note: --freeze-layers with no pretrained weights trains only the head on "
                "random features; add --no-freeze-layers to train the whole network.")
        log(f"Training only: {', '.join(freeze_backbone(model))}")
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"Trainable parameters: {sum(p.numel() for p in params):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = build_optimizer(args, params, setup.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.epochs, args.lrf, args.warmup_epochs))
    amp_dtype, scaler = amp_settings(args, setup.device)
    if amp_dtype is not None:
        log(f"Mixed precision: {str(amp_dtype).replace('torch.', '')} autocast.")
    settings = StepSettings(amp_dtype, scaler, args.accum_steps, args.clip_grad,
                            args.label_smoothing)
    return Optimisation(optimizer, scheduler, settings)


def freeze_backbone(model: VisionTransformer) -> list[str]:
    """Leave only the head and pre-logits trainable; return the names that train."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("head.", "pre_logits.")))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def build_optimizer(args: argparse.Namespace, params: list, device: torch.device
                    ) -> torch.optim.Optimizer:
    kwargs = dict(lr=args.lr, weight_decay=args.wd)
    if args.opt == "sgd":
        kwargs["momentum"] = args.momentum
    optimizer_class = torch.optim.SGD if args.opt == "sgd" else torch.optim.AdamW
    if device.type == "cuda":
        try:  # one fused kernel for the whole update, where this torch has it
            return optimizer_class(params, fused=True, **kwargs)
        except (TypeError, RuntimeError):
            pass
    return optimizer_class(params, **kwargs)


def amp_settings(args: argparse.Namespace, device: torch.device
                 ) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """bfloat16 autocast where the GPU supports it; float16 needs a gradient scaler."""
    use_amp = device.type == "cuda" if args.amp is None else args.amp
    if not use_amp:
        return None, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


@dataclass
class Progress:
    start_epoch: int
    best_acc: float  # the best validation accuracy so far; -1 before the first epoch
    log_dir: Path    # this run's TensorBoard folder


def start_or_resume(args: argparse.Namespace, resume: Checkpoint | None,
                    optimisation: Optimisation, log=print) -> Progress:
    """Epoch 0 in a new TensorBoard folder, or the resumed run's next epoch and state."""
    if resume is None:
        return Progress(0, -1.0, new_log_dir(Path(log_root(args))))
    restore_training_state(resume, optimisation.optimizer, optimisation.scheduler,
                           optimisation.settings.scaler)
    return Progress(resume.epoch + 1, resume.best_acc, resumed_log_dir(args, resume, log))


def new_log_dir(root: Path) -> Path:
    """A dated sub-folder of root that no run has yet."""
    log_dir = root / time.strftime("%Y%m%d-%H%M%S")
    while log_dir.exists():  # two runs started in the same second get folders of their own
        log_dir = log_dir.with_name(log_dir.name + "-")
    return log_dir


def resumed_log_dir(args: argparse.Namespace, resume: Checkpoint, log=print) -> Path:
    """The curves go on in the resumed run's folder; a --log-dir given elsewhere wins (a copied
    run, or a log disk that filled up), with a sub-folder of the same name there."""
    if resume.log_dir is None:
        return new_log_dir(Path(log_root(args)))
    stored = Path(resume.log_dir)
    if args.log_dir is None or Path(args.log_dir).resolve() == stored.parent.resolve():
        return stored
    moved = Path(args.log_dir) / stored.name
    log(f"note: the curves go on in {moved} (--log-dir), not in the run's {stored}.")
    return moved


# --------------------------------------------------------------------------- wrappers

@dataclass
class Wrappers:
    """The model as each use needs it, as torchvision's model_without_ddp and nanoGPT's
    raw_model: the plain model is what is saved and what the features cache runs."""

    model: VisionTransformer
    model_for_training: nn.Module  # with CUDA graphs, DDP and torch.compile as switched on
    model_for_eval: nn.Module      # compiled with --compile, else the plain model
    ddp: nn.Module | None          # the DistributedDataParallel wrapper under torchrun
    frozen_head: FrozenHeadTraining | None = None  # --frozen-batch, --cache-train-features


def wrap_for_training(model: VisionTransformer, args: argparse.Namespace, setup: Setup,
                      settings: StepSettings) -> Wrappers:
    """--grad-checkpointing on the plain model, then torch.compile, DDP around it (as nanoGPT
    and torchvision), then CUDA graphs: with --compile, CudaGraphModel captures the compiled
    module (cuda_graphs.py says why this and not mode="reduce-overhead"). The plain model
    stays what is saved."""
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
        if args.freeze_layers:
            setup.log("note: --grad-checkpointing saves nothing with a frozen backbone: no "
                      "activations are kept for its backward pass.")
    compiled = torch.compile(model) if args.compile else model
    model_for_training = compiled
    ddp = None
    if setup.dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device = setup.device
        ddp = model_for_training = DistributedDataParallel(
            compiled, device_ids=[device.index] if device.type == "cuda" else None)
    if use_cuda_graphs(args.cuda_graphs, setup.device, setup.dist_info, setup.log):
        # Around the compiled module with --compile: if capturing fails, training goes on
        # compiled, without graphs.
        model_for_training = CudaGraphModel(model_for_training, settings.amp_dtype,
                                            args.accum_steps > 1, log=setup.log)
        of_what = " of the compiled model" if args.compile else ""
        setup.log(f"CUDA graphs: training steps replay one captured forward and "
                  f"backward{of_what}.")
    return Wrappers(model, model_for_training, compiled, ddp)


def choose_training_paths(args: argparse.Namespace, model: VisionTransformer, setup: Setup,
                          wrappers: Wrappers) -> FrozenHeadTraining | None:
    """The frozen-backbone path (frozen_features.py), or None for the per-batch loop."""
    cuda_graphs = isinstance(wrappers.model_for_training, CudaGraphModel)
    return plan_frozen_head(args, model, setup.device, setup.dist_info, cuda_graphs, setup.log)


def capture_cuda_graphs(wrappers: Wrappers, batch_size: int, device: torch.device) -> None:
    """With CUDA graphs, capture them now, at the training batch's shape, before any data
    loader starts its threads (CudaGraphModel.capture_for says why)."""
    graphs = wrappers.model_for_training
    if isinstance(graphs, CudaGraphModel):
        side = wrappers.model.image_size
        graphs.capture_for(torch.zeros(batch_size, 3, side, side, device=device))


# --------------------------------------------------------------------------- the epochs

def train_epoch(wrappers: Wrappers, optimizer: torch.optim.Optimizer, loader,
                device: torch.device, epoch: int, settings: StepSettings,
                dist_info: Distributed) -> EpochStats:
    """The training pass: the frozen-backbone path where it was chosen, else per batch."""
    if wrappers.frozen_head is not None:
        return wrappers.frozen_head.train_one_epoch(optimizer, loader, device, epoch,
                                                    settings, dist_info)
    return train_one_epoch(wrappers.model_for_training, optimizer, loader, device, epoch,
                           settings, dist_info)


def train_and_validate(epoch: int, setup: Setup, wrappers: Wrappers, loaders: tuple,
                       optimisation: Optimisation, feature_cache: FeatureCache | None,
                       num_classes: int) -> tuple[EpochStats, EpochStats]:
    """One epoch: a pass over the training data, the schedule's step, then validation."""
    train_loader, val_loader = loaders
    device, dist_info = setup.device, setup.dist_info
    getattr(train_loader, "sampler", train_loader).set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # join() lets ranks whose share is one batch shorter finish the epoch cleanly.
    uneven = wrappers.ddp.join() if wrappers.ddp is not None else contextlib.nullcontext()
    with uneven:
        train_stats = train_epoch(wrappers, optimisation.optimizer, train_loader, device,
                                  epoch, optimisation.settings, dist_info)
    optimisation.scheduler.step()
    amp_dtype = optimisation.settings.amp_dtype
    if feature_cache is not None:
        val_stats = feature_cache.evaluate(wrappers.model, val_loader, device, epoch,
                                           amp_dtype, dist_info, num_classes)
    else:
        val_stats = evaluate(wrappers.model_for_eval, val_loader, device, epoch, amp_dtype,
                             dist_info, num_classes)
    return train_stats, val_stats


def epoch_metrics(train_stats: EpochStats, val_stats: EpochStats, lr: float,
                  device: torch.device) -> dict[str, float]:
    """The checkpoint's "metrics" and TensorBoard's scalars of one epoch."""
    metrics = {"train_loss": train_stats.loss, "train_acc": train_stats.acc,
               "val_loss": val_stats.loss, "val_acc": val_stats.acc,
               "learning_rate": lr, "images_per_sec": train_stats.images_per_sec}
    if device.type == "cuda":
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


class TensorBoard:
    """TensorBoard's writer, used on the checkpoint writer's thread only.

    A failed write (a full --log-dir disk) is one warning, and the run goes on without curves:
    the checkpoints hold every epoch's metrics, and stopping would cost the rest of the run
    (or, at the end, its last epoch) for a log that can be drawn again from them.
    """

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy; only when training

        self.log_dir = log_dir
        with writing(log_dir):  # before the first epoch nothing is lost: an error, exit 1
            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.failed = False

    def write(self, method: str, *args, **kwargs) -> None:
        """self.writer.method(*args, **kwargs), unless a write failed before."""
        if self.failed:
            return
        try:
            getattr(self.writer, method)(*args, **kwargs)
        except OSError as err:
            self.failed = True
            # On this thread while the next epoch's progress bar is drawn: tqdm.write puts the
            # line above the bar, not in the middle of it.
            tqdm.write(f"warning: TensorBoard cannot write to {self.log_dir} "
                       f"({err.strerror or err}); training goes on without curves (each "
                       f"checkpoint holds its epoch's metrics).", file=sys.stdout)
            with contextlib.suppress(OSError):
                self.writer.close()

    def add_scalars(self, metrics: dict[str, float], epoch: int) -> None:
        for tag, value in metrics.items():
            self.write("add_scalar", tag, value, epoch)

    def close(self) -> None:
        self.write("close")


class RunOutputs:
    """What rank 0 writes: class_indices.json, the checkpoints and TensorBoard's curves.

    Checkpoints and figures are written on a background thread (CheckpointWriter) while
    the next epoch trains.
    """

    def __init__(self, args: argparse.Namespace, split: Split, log_dir: Path) -> None:
        self.output_dir = Path(args.output_dir)
        self.keep = args.keep
        self.class_names = split.class_names
        # This run's TensorBoard folder first: a refusal there leaves nothing written yet.
        make_output_dir(log_dir, "--log-dir")
        # claim_output_dir made the output folder.
        write_class_indices(split.class_names, self.output_dir / CLASS_INDICES_FILE)
        self.tensorboard = TensorBoard(log_dir)
        self.saver = CheckpointWriter()
        # The validation images whose attention TensorBoard shows each epoch: spread over the
        # split, which lists the classes in order, so most classes are among them.
        count = min(ATTENTION_IMAGES, len(split.val_images))
        chosen = [len(split.val_images) * i // count for i in range(count)]
        self.attention_paths = [split.val_images[i] for i in chosen]
        self.attention_titles = [split.class_names[split.val_labels[i]] for i in chosen]
        self.exif_transpose = args.exif_transpose
        self.attention_batch: torch.Tensor | None = None  # read on first use, then kept
        self.attention_fixed = args.freeze_layers
        self.attention_picture: Future[np.ndarray] | None = None  # kept when fixed

    def attention_images(self, image_size: int) -> torch.Tensor:
        """The fixed validation images as validation sees them, (N, 3, H, W) at the model's
        input size: read from disk on the first call, the same tensor every later one."""
        if self.attention_batch is None:
            images = MyDataSet(self.attention_paths, [0] * len(self.attention_paths),
                               build_transforms(image_size, train=False),
                               exif_transpose=self.exif_transpose)
            self.attention_batch = torch.stack([image for image, _ in images])
        return self.attention_batch

    def attention_rollout(self, epoch: int, model: VisionTransformer,
                          device: torch.device) -> None:
        """The rollout of the fixed validation images, computed here (four images: cheap) on
        the plain model, drawn on the writer's thread.

        With --freeze-layers the blocks never change, and neither does their attention: it
        is computed and drawn once, and the same picture is logged for every epoch.
        """
        if self.attention_picture is None:
            batch = self.attention_images(model.image_size)
            was_training = model.training
            with torch.no_grad():
                rollout = attention_rollout(model.eval().attention_maps(batch.to(device))).cpu()
            model.train(was_training)

            def draw() -> np.ndarray:
                from grad_cam import overlay_on_crop

                pictures = [overlay_on_crop(crop, grid)
                            for crop, grid in zip(unnormalize(batch), rollout, strict=True)]
                return figure_pixels(plot_prediction_grid(pictures, self.attention_titles,
                                                          columns=len(pictures)))

            picture = self.saver.run(draw)
            if self.attention_fixed:
                self.attention_picture = picture
        else:
            picture = self.attention_picture
        # Chained on the writer's thread (it runs its tasks in order), after the drawing.
        self.saver.run(lambda: self.tensorboard.write("add_image", "attention_rollout",
                                                      picture.result(), epoch,
                                                      dataformats="HWC"))

    def save_epoch(self, checkpoint: Checkpoint, is_best: bool) -> None:
        """Queue the epoch's checkpoint (and best.pth), ahead of its curves: what may fail
        there must not keep the epoch from being saved."""
        paths = [self.output_dir / epoch_file(checkpoint.epoch)]
        if is_best:
            paths.append(self.output_dir / BEST_FILE)
        with self.stop_on_failed_write():
            self.saver.save(checkpoint, paths, after=self.epoch_saved)

    def log_epoch(self, epoch: int, metrics: dict, confusion: torch.Tensor,
                  model: VisionTransformer, device: torch.device) -> None:
        """The epoch's curves, confusion matrix and attention rollout, on the writer's thread."""
        if self.tensorboard.failed:
            return
        self.saver.run(functools.partial(self.tensorboard.add_scalars, metrics, epoch))

        def confusion_figure() -> None:
            figure = plot_confusion_matrix(confusion, self.class_names,
                                           f"Validation, epoch {epoch}")
            self.tensorboard.write("add_figure", "confusion_matrix", figure, epoch)

        # Building and rendering the figure take half a second: off the training thread.
        self.saver.run(confusion_figure)
        self.attention_rollout(epoch, model, device)
        self.saver.run(functools.partial(self.tensorboard.write, "flush"))

    def epoch_saved(self) -> None:
        """On the writer's thread, once an epoch checkpoint is on disk: --keep's pruning, and
        interrupted.pth goes, its mid-epoch weights superseded by this newer checkpoint."""
        prune_checkpoints(self.output_dir, self.keep)
        self.remove_interrupted()

    def remove_interrupted(self) -> None:
        with contextlib.suppress(OSError):  # a stale file left is no reason to stop a run
            (self.output_dir / INTERRUPTED_FILE).unlink(missing_ok=True)

    @contextlib.contextmanager
    def stop_on_failed_write(self) -> Iterator[None]:
        """A failed write (disk full, a read-only folder) ends the run, naming what is safe."""
        try:
            yield
        except WriteError as err:
            last = newest_epoch_checkpoint(self.output_dir)
            raise WriteError(f"{err} Training stopped; the last good checkpoint is "
                             f"{last or 'none'}.") from None

    def finish(self) -> None:
        """Wait for every write; then --keep's pruning, also where a resumed run had no epoch
        left to train (claim_output_dir made best.pth right before)."""
        with self.stop_on_failed_write():
            self.saver.wait()
            prune_checkpoints(self.output_dir, self.keep)

    def save_interrupted(self, checkpoint: Checkpoint) -> Path:
        self.saver.wait()
        path = self.output_dir / INTERRUPTED_FILE
        save_checkpoint(checkpoint, path)
        return path

    def close(self) -> None:
        """Stop the writers; what failed was raised by finish() or save_epoch() already."""
        with contextlib.suppress(WriteError):
            self.saver.close()
        self.tensorboard.close()


# --------------------------------------------------------------------------- stopping

class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, docker stop, systemd, `timeout`): the run stops as at Ctrl-C.

    A KeyboardInterrupt, so that what handles Ctrl-C handles it too: run_epochs saves
    interrupted.pth, claim_output_dir cleans up, and DataLoader workers exit quietly.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _ignore(signum: int, frame: object) -> None:
    pass


@contextlib.contextmanager
def handling_signals(signals: tuple[int, ...], handler: Callable,
                     replacing: tuple) -> Iterator[None]:
    """handler for each of signals while the block runs, where the signal's handler now is one
    of `replacing`; the previous handler after. Others are left alone: a caller's own (e.g.
    benchmark.py's), SIG_IGN (nohup), and all of them off the main thread, which cannot set
    handlers."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            if signal.getsignal(signum) in replacing:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def sigterm_as_ctrl_c() -> contextlib.AbstractContextManager:
    """SIGTERM raises Terminated; by default it would end the process with nothing saved."""
    return handling_signals((signal.SIGTERM,), _raise_terminated, replacing=(signal.SIG_DFL,))


def no_second_stop() -> contextlib.AbstractContextManager:
    """Ctrl-C or SIGTERM again is ignored while the stopped run saves and says how to go on:
    a double press would cost interrupted.pth and the resume hint. (SIGKILL still ends it.)"""
    return handling_signals((signal.SIGINT, signal.SIGTERM), _ignore,
                    replacing=(signal.default_int_handler, _raise_terminated))


def stop_run(args: argparse.Namespace, split: Split, model: VisionTransformer, epoch: int,
             outputs: RunOutputs | None, stop: KeyboardInterrupt) -> int:
    """After Ctrl-C or SIGTERM in epoch `epoch`: rank 0 saves interrupted.pth and says how to
    continue; the exit status is 130 or 143."""
    status, how = ((TERMINATED_STATUS, "Stopped by SIGTERM") if isinstance(stop, Terminated)
                   else (INTERRUPTED_STATUS, "Interrupted"))
    if outputs is not None:
        path = outputs.save_interrupted(make_checkpoint(
            model, args.model_name, split.class_names, dict(vars(args)), epoch - 1, {},
            interrupted_in_epoch=epoch))
        outputs.finish()
        # A command that has --resume auto already (reproduce.py's) continues as it is.
        again = ("run the same command again to continue" if args.resume == "auto" else
                 "continue the run with the same command and --resume auto")
        start = ("it starts the first epoch again" if epoch == 0 else
                 "from the last complete epoch")
        print(f"\n{how} in epoch {epoch}. The weights at that moment are in {path}; "
              f"{again} ({start}).", file=sys.stderr)
    return status


def run_epochs(args: argparse.Namespace, setup: Setup, split: Split, wrappers: Wrappers,
               loaders: tuple, optimisation: Optimisation, progress: Progress,
               outputs: RunOutputs | None) -> int:
    """Train and validate each epoch; rank 0 logs and saves it. Ctrl-C saves and exits 130,
    SIGTERM the same with 143."""
    model = wrappers.model
    feature_cache = FeatureCache() if args.freeze_layers and args.cache_val_features else None
    epoch = progress.start_epoch
    try:
        for epoch in range(progress.start_epoch, args.epochs):
            lr = optimisation.optimizer.param_groups[0]["lr"]  # the rate used in this epoch
            train_stats, val_stats = train_and_validate(epoch, setup, wrappers, loaders,
                                                        optimisation, feature_cache,
                                                        len(split.class_names))
            metrics = epoch_metrics(train_stats, val_stats, lr, setup.device)
            if outputs is None:
                continue
            is_best = val_stats.acc > progress.best_acc
            progress.best_acc = max(progress.best_acc, val_stats.acc)
            checkpoint = make_checkpoint(
                model, args.model_name, split.class_names, dict(vars(args)), epoch, metrics,
                best_acc=progress.best_acc, log_dir=str(progress.log_dir),
                samples={"train": train_stats.samples, "val": val_stats.samples},
                **training_state(optimisation.optimizer, optimisation.scheduler,
                                 optimisation.settings.scaler))
            outputs.save_epoch(checkpoint, is_best)
            outputs.log_epoch(epoch, metrics, val_stats.confusion, model, setup.device)
        if outputs is not None:
            outputs.finish()
            outputs.remove_interrupted()  # also when a resumed run had no epoch left to train
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        with no_second_stop():
            return stop_run(args, split, model, epoch, outputs, stop)
    finally:
        if outputs is not None:
            outputs.close()
        shut_down(setup.dist_info)
    curves = ("no curves (TensorBoard failed)" if outputs is not None and
              outputs.tensorboard.failed else f"curves in {progress.log_dir} (tensorboard "
                                                 f"--logdir {progress.log_dir.parent})")
    setup.log(f"Best validation accuracy {progress.best_acc:.4f}; checkpoints in "
              f"{Path(args.output_dir)}, {curves}.")
    return 0


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    try:
        if args.demo:
            apply_demo_settings(args, given_options(argv))
        return train(args)
    except Terminated:  # before the epochs began
        print("\nTerminated.", file=sys.stderr)
        return TERMINATED_STATUS


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with sigterm_as_ctrl_c():
        return run_main(functools.partial(run, argv=argv), args)


if __name__ == "__main__":
    raise SystemExit(main())
