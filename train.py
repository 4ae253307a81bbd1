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
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cli import add_device_flag, add_model_name_flag, run_main
from demo_data import make_demo_flowers
from download import WEIGHTS_FILE
from errors import UserError
from my_dataset import MyDataSet, build_transforms
from utils import (
    CheckpointWriter,
    CudaGraphModel,
    Distributed,
    ShardSampler,
    Split,
    StepSettings,
    epoch_checkpoints,
    evaluate,
    init_distributed,
    lr_lambda,
    prune_checkpoints,
    read_split_data,
    save_checkpoint,
    select_device,
    train_one_epoch,
    write_class_indices,
)
from visualize import plot_confusion_matrix
from vit_model import VisionTransformer, create_model
from weights import build_model_for, fit_state_dict, read_weights

DEFAULT_WEIGHTS = f"./{WEIGHTS_FILE}"
DEMO_DATA = Path("demo_data") / "flower_photos"
# What --demo changes, unless the flag is given: a model and schedule that learn the
# synthetic flowers from scratch in about a minute on two CPU cores.
DEMO_SETTINGS = dict(data_path=str(DEMO_DATA), model_name="vit_demo_patch8_64", weights="",
                     freeze_layers=False, batch_size=16, lr=0.05, device="cpu")


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
    parser.add_argument("--data-path", default="./flower_photos",
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
    parser.add_argument("--output-dir", default="./weights",
                        help="where checkpoints and class_indices.json go (default: %(default)s)")
    parser.add_argument("--log-dir", default="runs",
                        help="TensorBoard log folder; each run gets a dated sub-folder "
                             "(default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size in pixels (default: the model's, 224); pretrained "
                             "position embeddings are resampled to fit")
    parser.add_argument("--val-rate", type=float, default=0.2,
                        help="fraction of each class held out for validation (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split and the run (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: the cores this process may use, "
                             "shared among torchrun's processes, at most 16)")
    parser.add_argument("--download", action="store_true",
                        help="fetch flower_photos and the in21k weights first, where missing")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: generate synthetic flowers and train a small ViT")

    speed = parser.add_argument_group("speed (each on where it helps; --no-X turns it off)")
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision: bfloat16 where the GPU has it, else float16 with "
                            "a gradient scaler (default: on for CUDA)")
    speed.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls for the float32 parts on CUDA")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (pays off on long runs: compiling "
                            "takes about a minute)")
    speed.add_argument("--device-data", action=argparse.BooleanOptionalAction, default=None,
                       help="decode every image once on the GPU and augment there, instead of "
                            "decoding JPEGs on the CPU every epoch (default: on for CUDA)")
    speed.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each training step's forward and backward as CUDA graphs: "
                            "small batches stop waiting on Python's kernel launches (default: "
                            "on for one CUDA process without --compile)")
    speed.add_argument("--val-batch-size", type=int, default=None,
                       help="validation batch (default: 2x --batch-size; no gradients to hold)")
    speed.add_argument("--cache-val-features", action=argparse.BooleanOptionalAction,
                       default=True, help="with a frozen backbone, compute the validation "
                                          "features once and run only the head afterwards")

    runs = parser.add_argument_group("never lose a run")
    runs.add_argument("--resume", default=None, metavar="CKPT",
                      help="continue from a model-*.pth; 'auto' takes the newest in "
                           "--output-dir (and starts fresh when there is none)")
    runs.add_argument("--keep", type=int, default=None, metavar="N",
                      help="keep only the newest N epoch checkpoints besides best.pth "
                           "(default: all, as the report)")

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
    return parser


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
    if Path(args.data_path) == DEMO_DATA:
        print(f"Demo: writing synthetic flower images to {DEMO_DATA} (not real photographs).")
        make_demo_flowers(DEMO_DATA)


def default_workers(dist_info: Distributed) -> int:
    """All the cores this process may use, shared among the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    return min(max((cores or 1) // local_world, 1), 16)


def build_dataloaders(split: Split, args: argparse.Namespace, img_size: int, workers: int,
                      device: torch.device, dist_info: Distributed, log=print):
    """Batches for training and validation: on the device when it pays, else a DataLoader."""
    use_device_data = device.type == "cuda" if args.device_data is None else args.device_data
    if use_device_data and not args.augment:
        log("note: --no-augment uses the CPU DataLoader; --device-data is off.")
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
                          build_transforms(img_size, train=args.augment))
    val_set = MyDataSet(split.val_images, split.val_labels, build_transforms(img_size, False))
    common = dict(num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    train_sampler = ShardSampler(len(train_set), shuffle=True, seed=args.seed, dist_info=dist_info)
    val_sampler = ShardSampler(len(val_set), shuffle=False, dist_info=dist_info)
    return (DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, **common),
            DataLoader(val_set, batch_size=args.val_batch_size or 2 * args.batch_size,
                       sampler=val_sampler, **common))


def build_model(args: argparse.Namespace, num_classes: int, log=print) -> VisionTransformer:
    """The model to fine-tune, with the pretrained weights loaded when --weights is given."""
    overrides = dict(num_classes=num_classes, has_logits=False)
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.drop_path:
        overrides["drop_path_rate"] = args.drop_path
    if not args.weights:
        return create_model(args.model_name, **overrides)
    if not Path(args.weights).exists():  # a Hugging Face folder is fine too
        raise UserError(f"Weights file {args.weights} not found: download it with "
                        f"'python download.py weights' (or add --download), or pass "
                        f"--weights '' to train from scratch.")
    weights = read_weights(args.weights)
    model = build_model_for(weights, args.model_name, fine_tune=overrides)
    state_dict, report = fit_state_dict(model, weights.state_dict)
    model.load_state_dict(state_dict, strict=False)
    log(f"Weights {args.weights} ({weights.format}): {report}")
    return model


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


def use_cuda_graphs(args: argparse.Namespace, device: torch.device, dist_info: Distributed,
                    log=print) -> bool:
    """CUDA graphs where they work: one CUDA process, the model not compiled."""
    if args.cuda_graphs is False:
        return False
    reason = None
    if device.type != "cuda":
        reason = f"they need a CUDA device, and this run uses {device.type}"
    elif dist_info.enabled:
        reason = "DistributedDataParallel's gradient hooks cannot be captured"
    elif args.compile:
        reason = "--compile is on (its mode='reduce-overhead' would capture instead)"
    if reason is None:
        return True
    if args.cuda_graphs:  # asked for by name: say why not
        log(f"note: --cuda-graphs is off: {reason}.")
    return False


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(states["cuda"])


def resolve_resume(args: argparse.Namespace, log=print) -> dict | None:
    """The checkpoint to continue from, or None to start fresh."""
    if not args.resume:
        return None
    if args.resume == "auto":
        found = epoch_checkpoints(args.output_dir)
        if not found:
            log(f"--resume auto: no checkpoint in {args.output_dir}; starting fresh.")
            return None
        path = found[-1][1]
    else:
        path = Path(args.resume)
        if not path.is_file():
            raise UserError(f"--resume {path}: no such checkpoint.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or not a checkpoint at all
        raise UserError(f"--resume {path} cannot be read ({type(err).__name__}); pick an "
                        f"earlier model-*.pth.") from None
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
        raise UserError(f"{path} is not an epoch checkpoint of train.py (it has no optimizer "
                        f"state); use it as --weights to fine-tune from it instead.")
    log(f"Resuming from {path} (epoch {checkpoint['epoch']} done).")
    return checkpoint


def make_checkpoint(model: VisionTransformer, args: argparse.Namespace, split: Split,
                    epoch: int, metrics: dict, **state) -> dict:
    """Everything predict.py needs (model, its arguments, class names) and resume needs."""
    return {
        "model": model.state_dict(),
        "model_name": args.model_name,
        "model_args": model.model_args,
        "class_names": split.class_names,
        "epoch": epoch,
        "metrics": metrics,
        "args": dict(vars(args)),
        **state,
    }


def fetch_missing(args: argparse.Namespace, log=print) -> None:
    """--download: get flower_photos and the weights where the paths name them but hold nothing."""
    import download  # the URLs are read here, at call time, so a mirror can be set

    data = Path(args.data_path)
    if not data.exists():
        if data.name != "flower_photos":
            raise UserError(f"--download fetches flower_photos; {data} names another folder.")
        data.parent.mkdir(parents=True, exist_ok=True)
        log(f"Downloading flower_photos to {data} ...")
        download.download_flowers(data.parent, download.FLOWERS_URL,
                                  download.FLOWER_CLASS_COUNTS)
    if args.weights and not Path(args.weights).exists():
        fmt = "npz" if args.weights.endswith(".npz") else "pth"
        log(f"Downloading the ImageNet-21k ViT-B/16 weights to {args.weights} ...")
        download.download_weights(fmt, Path(args.weights), download.WEIGHTS[fmt].url)


def train(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.accum_steps < 1:
        raise UserError("--epochs, --batch-size and --accum-steps must be at least 1 and --lr "
                        "positive.")
    device = select_device(args.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    log = print if dist_info.is_main else (lambda *a, **k: None)
    if args.download:
        if dist_info.is_main:
            fetch_missing(args, log)
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's download
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv once
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)

    split = read_split_data(args.data_path, args.val_rate, args.seed,
                            warn=log if dist_info.is_main else (lambda *a: None))
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

    resume = resolve_resume(args, log)
    if resume is not None:
        if resume.get("class_names") != split.class_names:
            raise UserError(f"--resume: the checkpoint's classes {resume.get('class_names')} "
                            f"differ from {args.data_path}'s {split.class_names}.")
        model = VisionTransformer(**resume["model_args"])
        model.load_state_dict(resume["model"])
    else:
        model = build_model(args, num_classes, log)
    model.to(device)
    img_size = model.image_size
    workers = default_workers(dist_info) if args.workers is None else args.workers
    log(f"Using {workers} dataloader workers every process")
    train_loader, val_loader = build_dataloaders(split, args, img_size, workers, device,
                                                 dist_info, log)

    if args.freeze_layers:
        if not args.weights and resume is None:
            log("note: --freeze-layers with no pretrained weights trains only the head on "
                "random features; add --no-freeze-layers to train the whole network.")
        log(f"Training only: {', '.join(freeze_backbone(model))}")
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"Trainable parameters: {sum(p.numel() for p in params):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = build_optimizer(args, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.epochs, args.lrf, args.warmup_epochs))
    amp_dtype, scaler = amp_settings(args, device)
    if amp_dtype is not None:
        log(f"Mixed precision: {str(amp_dtype).replace('torch.', '')} autocast.")

    start_epoch, best_acc = 0, -1.0
    log_dir = Path(args.log_dir) / time.strftime("%Y%m%d-%H%M%S")
    while log_dir.exists():  # two runs started in the same second get folders of their own
        log_dir = log_dir.with_name(log_dir.name + "-")
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["lr_scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, best_acc = resume["epoch"] + 1, resume["best_acc"]
        log_dir = Path(resume.get("log_dir", log_dir))  # the curves go on in the same run
        set_rng_states(resume["rng_states"])
        del resume  # the checkpoint's tensors are in the model now; free the copies

    runner = torch.compile(model) if args.compile else model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    train_runner = runner
    if use_cuda_graphs(args, device, dist_info, log):
        train_runner = CudaGraphModel(runner, amp_dtype, args.accum_steps > 1, log=log)
        log("CUDA graphs: training steps replay one captured forward and backward.")
    settings = StepSettings(amp_dtype, scaler, args.accum_steps, args.clip_grad,
                            args.label_smoothing)
    features_cache = {} if args.freeze_layers and args.cache_val_features else None

    output_dir = Path(args.output_dir)
    writer = saver = None
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_class_indices(split.class_names, output_dir / "class_indices.json")
        from torch.utils.tensorboard import SummaryWriter  # heavy; only when training

        writer = SummaryWriter(log_dir=str(log_dir))
        saver = CheckpointWriter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            getattr(train_loader, "sampler", train_loader).set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # join() lets ranks whose share is one batch shorter finish the epoch cleanly.
            uneven = runner.join() if dist_info.enabled else contextlib.nullcontext()
            with uneven:
                train_stats = train_one_epoch(train_runner, optimizer, train_loader, device,
                                              epoch, settings, dist_info)
            scheduler.step()
            val_stats = evaluate(runner, val_loader, device, epoch, amp_dtype, dist_info,
                                 features_cache, num_classes)
            metrics = {"train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
                       "val_loss": val_stats["loss"], "val_acc": val_stats["acc"],
                       "learning_rate": lr, "images_per_sec": train_stats["images_per_sec"]}
            if device.type == "cuda":
                metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if not dist_info.is_main:
                continue
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, epoch)
            figure = plot_confusion_matrix(val_stats["confusion"], split.class_names,
                                           f"Validation, epoch {epoch}")
            # Rendering takes a few tenths of a second: off the training thread.
            saver.run(functools.partial(writer.add_figure, "confusion_matrix", figure, epoch))
            is_best = val_stats["acc"] > best_acc
            best_acc = max(best_acc, val_stats["acc"])
            checkpoint = make_checkpoint(
                model, args, split, epoch, metrics, best_acc=best_acc,
                optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                rng_states=rng_states(), log_dir=str(log_dir),
                samples={"train": train_stats["samples"], "val": val_stats["samples"]})
            paths = [output_dir / f"model-{epoch}.pth"] + ([output_dir / "best.pth"]
                                                           if is_best else [])
            saver.save(checkpoint, paths, after=lambda: prune_checkpoints(output_dir, args.keep))
            saver.run(writer.flush)
    except KeyboardInterrupt:
        if dist_info.is_main:
            saver.wait()
            save_checkpoint(make_checkpoint(model, args, split, epoch - 1, {},
                                            interrupted_in_epoch=epoch),
                            output_dir / "interrupted.pth")
            print(f"\nInterrupted in epoch {epoch}. The weights at that moment are in "
                  f"{output_dir / 'interrupted.pth'}; continue the run with the same command "
                  f"and --resume auto (from the last complete epoch).", file=sys.stderr)
        return 130
    finally:
        if saver is not None:
            saver.close()
        if writer is not None:
            writer.close()
        if dist_info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
    log(f"Best validation accuracy {best_acc:.4f}; checkpoints in {output_dir}, "
        f"curves in {log_dir} (tensorboard --logdir {args.log_dir}).")
    return 0


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.demo:
        apply_demo_settings(args, given_options(argv))
    return train(args)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_main(functools.partial(run, argv=argv), args)


if __name__ == "__main__":
    raise SystemExit(main())
