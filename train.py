"""Fine-tune a ViT on a folder of images (one sub-folder per class), as the report does.

    python train.py --freeze-layers            # the report's run 1: in21k weights, head only
    python train.py --no-freeze-layers         # run 2: the whole network
    python train.py --weights '' --no-freeze-layers --epochs 48   # run 3: from scratch
    python train.py --demo                     # offline: synthetic flowers, a small ViT, CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from demo_data import make_demo_flowers
from my_dataset import MyDataSet, build_transforms
from utils import (
    NonFiniteLossError,
    Split,
    UserError,
    cosine_lambda,
    evaluate,
    read_split_data,
    save_checkpoint,
    select_device,
    train_one_epoch,
    write_class_indices,
)
from vit_model import VisionTransformer, create_model, list_models
from weights import WeightsError, fit_state_dict, read_weights

DEFAULT_WEIGHTS = "./vit_base_patch16_224_in21k.pth"
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
        description="Fine-tune a Vision Transformer on a folder of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-classes", "--num_classes", type=int, default=None,
                        help="number of classes (default: the number of class folders)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--lrf", type=float, default=0.01,
                        help="final learning rate as a fraction of --lr (cosine schedule)")
    parser.add_argument("--data-path", default="./flower_photos",
                        help="folder with one sub-folder of images per class")
    parser.add_argument("--model-name", default="vit_base_patch16_224_in21k",
                        choices=list_models(), metavar="NAME",
                        help=f"architecture, one of: {', '.join(list_models())}")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="pretrained weights to start from; '' trains from scratch")
    # The report's flag was type=bool, so "--freeze-layers False" was True. Here
    # --no-freeze-layers and --freeze-layers false|0|no all turn it off.
    parser.add_argument("--freeze-layers", nargs="?", const=True, default=True,
                        type=str_to_bool, metavar="BOOL",
                        help="train only the head (and pre-logits); --no-freeze-layers trains all")
    parser.add_argument("--no-freeze-layers", dest="freeze_layers", action="store_false",
                        help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda:0",
                        help="cuda:N, cpu or mps; falls back to the CPU when CUDA is absent")
    parser.add_argument("--output-dir", default="./weights",
                        help="where checkpoints and class_indices.json go")
    parser.add_argument("--log-dir", default="runs", help="TensorBoard log folder")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size in pixels (default: the model's, 224)")
    parser.add_argument("--val-rate", type=float, default=0.2,
                        help="fraction of each class held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the run")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: min(cpus, batch size, 8))")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: generate synthetic flowers and train a small ViT")
    return parser


def apply_demo_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--demo changes the settings the user left at their defaults, and makes the data."""
    for name, value in DEMO_SETTINGS.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if Path(args.data_path) == DEMO_DATA:
        print(f"Demo: writing synthetic flower images to {DEMO_DATA} (not real photographs).")
        make_demo_flowers(DEMO_DATA)


def default_workers(batch_size: int) -> int:
    return min(os.cpu_count() or 1, batch_size if batch_size > 1 else 0, 8)


def build_dataloaders(split: Split, img_size: int, batch_size: int, workers: int,
                      device: torch.device) -> tuple[DataLoader, DataLoader]:
    train_set = MyDataSet(split.train_images, split.train_labels, build_transforms(img_size, True))
    val_set = MyDataSet(split.val_images, split.val_labels, build_transforms(img_size, False))
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    return (DataLoader(train_set, shuffle=True, **common),
            DataLoader(val_set, shuffle=False, **common))


def build_model(args: argparse.Namespace, num_classes: int) -> VisionTransformer:
    """The model to fine-tune, with the pretrained weights loaded when --weights is given."""
    overrides = dict(num_classes=num_classes, has_logits=False)
    if args.img_size:
        overrides["img_size"] = args.img_size
    if not args.weights:
        return create_model(args.model_name, **overrides)
    if not Path(args.weights).is_file():
        raise UserError(f"Weights file {args.weights} not found: download it with "
                        f"'python download.py weights', or pass --weights '' to train from "
                        f"scratch.")
    weights = read_weights(args.weights)
    if "layer_norm_eps" in weights.model_args:  # Hugging Face files use 1e-12
        overrides["layer_norm_eps"] = weights.model_args["layer_norm_eps"]
    model = create_model(args.model_name, **overrides)
    state_dict, report = fit_state_dict(model, weights.state_dict)
    model.load_state_dict(state_dict, strict=False)
    print(f"Weights {args.weights} ({weights.format}): {report}")
    return model


def freeze_backbone(model: VisionTransformer) -> list[str]:
    """Leave only the head and pre-logits trainable; return the names that train."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("head.", "pre_logits.")))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def make_checkpoint(model: VisionTransformer, args: argparse.Namespace, split: Split,
                    epoch: int, metrics: dict) -> dict:
    return {
        "model": model.state_dict(),
        "model_name": args.model_name,
        "model_args": model.model_args,
        "class_names": split.class_names,
        "epoch": epoch,
        "metrics": metrics,
        "args": {k: v for k, v in vars(args).items()},
    }


def train(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("--epochs and --batch-size must be at least 1 and --lr positive.")
    device = select_device(args.device)
    torch.manual_seed(args.seed)

    split = read_split_data(args.data_path, args.val_rate, args.seed)
    print(f"{split.num_images} images were found in the dataset.")
    print(f"{len(split.train_images)} images for training.")
    print(f"{len(split.val_images)} images for validation.")
    if split.skipped:
        print(f"{len(split.skipped)} unreadable files were skipped.")
    if not split.train_images or not split.val_images:
        raise UserError(f"{args.data_path} gives {len(split.train_images)} training and "
                        f"{len(split.val_images)} validation images; both need at least one "
                        f"(add images or change --val-rate).")
    num_classes = len(split.class_names)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.data_path} has "
                        f"{num_classes} class folders ({', '.join(split.class_names)}).")

    model = build_model(args, num_classes).to(device)
    img_size = model.patch_embed.img_size
    workers = default_workers(args.batch_size) if args.workers is None else args.workers
    print(f"Using {workers} dataloader workers every process")
    train_loader, val_loader = build_dataloaders(split, img_size, args.batch_size, workers, device)

    if args.freeze_layers:
        if not args.weights:
            print("note: --freeze-layers with no pretrained weights trains only the head on "
                  "random features; add --no-freeze-layers to train the whole network.")
        trainable = freeze_backbone(model)
        print(f"Training only: {', '.join(trainable)}")
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"Trainable parameters: {sum(p.numel() for p in params):,} of "
          f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(args.epochs, args.lrf))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_class_indices(split.class_names, output_dir / "class_indices.json")
    from torch.utils.tensorboard import SummaryWriter  # heavy; only when training
    log_dir = Path(args.log_dir) / time.strftime("%Y%m%d-%H%M%S")
    best_acc = -1.0
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for epoch in range(args.epochs):
            lr = optimizer.param_groups[0]["lr"]
            train_stats = train_one_epoch(model, optimizer, train_loader, device, epoch)
            scheduler.step()
            val_stats = evaluate(model, val_loader, device, epoch)
            metrics = {"train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
                       "val_loss": val_stats["loss"], "val_acc": val_stats["acc"],
                       "learning_rate": lr}
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, epoch)
            writer.flush()

            checkpoint = make_checkpoint(model, args, split, epoch, metrics)
            save_checkpoint(checkpoint, output_dir / f"model-{epoch}.pth")
            if val_stats["acc"] > best_acc:
                best_acc = val_stats["acc"]
                save_checkpoint(checkpoint, output_dir / "best.pth")
    print(f"Best validation accuracy {best_acc:.4f}; checkpoints in {output_dir}, "
          f"curves in {log_dir} (tensorboard --logdir {args.log_dir}).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        if args.demo:
            apply_demo_settings(args, parser)
        return train(args)
    except (UserError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
