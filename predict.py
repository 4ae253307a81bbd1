"""Classify images with a trained checkpoint; optionally show where the model looks.

    python predict.py flower_photos/tulips/10791227_7168491604.jpg
    python predict.py IMAGE --weights weights/model-9.pth --save-fig prediction.png
    python predict.py flower_photos/roses my_photos/ a.jpg --topk 2 --save-fig grid.png
    python predict.py flower_photos --json > predictions.jsonl
    python predict.py IMAGE --attention attention.png      # attention rollout + last block
    python predict.py IMAGE --grad-cam gradcam.png --target-class roses   # Grad-CAM

Folders are searched recursively for image files (.jpg, .jpeg, .png, ... in any case;
names starting with "." are left out). A file in a folder that cannot be decoded is
named on stderr and skipped. For one image every class is printed, in class order;
for several, a block per image with the top 3 (--topk changes both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from checkpoints import (
    BEST_FILE,
    CLASS_INDICES_FILE,
    DEFAULT_OUTPUT_DIR,
    find_checkpoint,
    newest_epoch_checkpoint,
    peek_checkpoint,
)
from cli import DEFAULT_MODEL, add_device_flag, add_weights_flags, run_main
from errors import UserError, WeightsError, check_output_dir, check_output_file
from my_dataset import (
    IMG_EXTENSIONS_HINT,
    MyDataSet,
    build_transforms,
    check_image,
    is_image_file,
    open_rgb,
    unnormalize,
)
from utils import read_class_indices, select_device
from vit_model import VisionTransformer
from weights import head_is_zero, load_model_for, read_weights

MAX_GRID = 64  # images in one --save-fig grid; beyond that the pictures become stamps
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict the class of images: files and folders (searched recursively).")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files and folders of images")
    add_weights_flags(parser)
    add_device_flag(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help="image-loading processes (default: 0 for one batch, else up to 4)")
    parser.add_argument("--topk", type=int, default=None, metavar="K",
                        help="print the K most likely classes (default: all for one image, "
                             "3 for several)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image on stdout (path, predicted, prob, "
                             "topk); notices go to stderr")
    parser.add_argument("--save-fig", default=None, metavar="PATH",
                        help="save the image with its prediction as the title; a grid of up "
                             f"to {MAX_GRID} for several images ({', '.join(FIGURE_SUFFIXES)})")
    parser.add_argument("--attention", default=None, metavar="PATH",
                        help="save each image beside its attention rollout and the last "
                             "block's class-token attention: a .png for one image, else a "
                             "folder with one <name>.attention.png per image")
    parser.add_argument("--show", action="store_true", help="open a window with the figure")
    parser.add_argument("--grad-cam", default=None, metavar="PATH",
                        help="save each image beside its Grad-CAM heat map: a .png for one "
                             "image, else a folder with one <name>.gradcam.png per image")
    parser.add_argument("--target-class", default=None, metavar="NAME",
                        help="--grad-cam's class for every image (default: each image's "
                             "predicted class)")
    parser.add_argument("--cam-layer", type=int, default=-1, metavar="N",
                        help="--grad-cam's block, whose norm1 output is the layer (default: "
                             "-1, the last; negative indexes count from the end)")
    return parser


# --------------------------------------------------------------------------- inputs


def _folder_images(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if path.is_file() and is_image_file(path) and not any(p.startswith(".") for p in relative):
            yield path


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files and folders -> (readable images, [(file, why) it cannot be read]).

    A path that does not exist, or a folder without image files, is the user's mistake
    and raises; a broken file is reported and left for the caller to skip.
    """
    candidates: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = list(_folder_images(path))
            if not found:
                raise UserError(f"Folder {path} has no image files "
                                f"({IMG_EXTENSIONS_HINT}), searched recursively.")
            candidates += found
        elif path.is_file():
            candidates.append(path)
        else:
            raise UserError(f"Image {path} does not exist.")
    candidates = list(dict.fromkeys(candidates))  # the same file named twice is predicted once
    # Decoding checks are I/O-bound and release the GIL: threads make a big folder quick.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(check_image, candidates))
    readable = [p for p, why in zip(candidates, problems, strict=True) if why is None]
    unreadable = [(p, why) for p, why in zip(candidates, problems, strict=True) if why is not None]
    return readable, unreadable


# --------------------------------------------------------------------------- model


def resolve_weights(path: str | None) -> Path:
    """--weights as a path (a file or a Hugging Face folder); by default the newest in
    train.py's default output folder."""
    if path is None:
        return default_weights()
    if not path:  # Path('') is the current folder
        raise UserError("--weights is empty; name a weights file or Hugging Face folder.")
    if not Path(path).exists():
        raise UserError(f"Weights file {path} does not exist.")
    return Path(path)


def default_weights() -> Path:
    """best.pth in train.py's default output folder, else its newest model-*.pth. A best.pth
    that cannot be read (a copy cut short, a full disk) is passed over for the newest epoch
    checkpoint, with a note: without --weights the user asked for the run's model, and the
    run has another."""
    found = find_checkpoint(DEFAULT_OUTPUT_DIR)
    if found is None:
        raise UserError(f"No checkpoint in ./{DEFAULT_OUTPUT_DIR}; train one (python "
                        "train.py, or python train.py --demo) or pass --weights.")
    newest = newest_epoch_checkpoint(DEFAULT_OUTPUT_DIR)
    # peek_checkpoint reads only the file's header, so a good best.pth costs little here.
    if found.name != BEST_FILE or newest is None or peek_checkpoint(found) is not None:
        return found
    try:
        read_weights(found)  # not this project's checkpoint, yet maybe readable weights
    except WeightsError as err:
        print(f"note: {err} Using {newest}, the run's newest epoch checkpoint, instead.",
              file=sys.stderr)
        return newest
    return found


def load_classifier(weights_path: Path, class_indices: str | None = None,
                    model_name: str = DEFAULT_MODEL) -> tuple[VisionTransformer, list[str]]:
    """The model these weights need, loaded, with its class names."""
    weights = read_weights(weights_path)
    model = load_model_for(weights, model_name)
    if model.num_classes == 0:  # said before class names are looked for: they would not help
        raise UserError(f"{weights_path} has no classification head, only features; fine-tune "
                        f"it first (python train.py --weights {weights_path}).")
    class_names = weights.class_names or _class_names_for(weights_path, class_indices)
    if model.num_classes != len(class_names):
        raise UserError(f"{weights_path} has a {model.num_classes}-class head but "
                        f"{len(class_names)} class names were given; pass --class-indices "
                        f"with {model.num_classes} names, or fine-tune it on your classes "
                        f"(python train.py --weights {weights_path}).")
    if head_is_zero(weights.state_dict):
        print(f"warning: the head in {weights_path} is all zeros (as in the ImageNet-21k "
              f"release); every class gets the same probability. Fine-tune it first.",
              file=sys.stderr)
    return model, class_names


def _class_names_for(weights_path: Path, class_indices: str | None) -> list[str]:
    """--class-indices, else class_indices.json beside the weights (in a Hugging Face folder),
    else in the current folder."""
    if class_indices and not Path(class_indices).is_file():
        raise UserError(f"--class-indices {class_indices} is not a file.")
    beside = weights_path if weights_path.is_dir() else weights_path.parent
    candidates = ([Path(class_indices)] if class_indices
                  else [beside / CLASS_INDICES_FILE, Path(CLASS_INDICES_FILE)])
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"{weights_path} does not name its classes and no "
                        f"class_indices.json was found; pass --class-indices.")
    return read_class_indices(found)


def image_loader(model: VisionTransformer, paths: list[Path], batch_size: int = 32,
                 workers: int | None = None) -> DataLoader:
    """Batches of images with the report's evaluation transform (Resize, CenterCrop)."""
    if workers is None:
        workers = 0 if len(paths) <= batch_size else min(4, os.cpu_count() or 1)
    # One process per batch at most: more would only start and wait (--workers 100000 ran
    # the machine out of memory).
    workers = min(workers, math.ceil(len(paths) / batch_size))
    # A photo is shown upright by its EXIF orientation; the model sees it the same way.
    dataset = MyDataSet(paths, [0] * len(paths),
                        build_transforms(model.image_size, train=False), exif_transpose=True)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.inference_mode()
def predict_probs(model: VisionTransformer, paths: list[Path], device: torch.device,
                  batch_size: int = 32, workers: int | None = None) -> torch.Tensor:
    """Class probabilities, (len(paths), num_classes), on the CPU; the fused SDPA path."""
    model = model.eval().to(device)
    chunks = [torch.softmax(model(images.to(device)), dim=1).float().cpu()
              for images, _ in image_loader(model, paths, batch_size, workers)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.num_classes)


def predict_image(model: VisionTransformer, image_path: str | Path,
                  device: torch.device) -> torch.Tensor:
    """Class probabilities of one image, (num_classes,)."""
    return predict_probs(model, [Path(image_path)], device, batch_size=1, workers=0)[0]


@torch.inference_mode()
def attention_grids(model: VisionTransformer, paths: list[Path], device: torch.device,
                    batch_size: int = 32, workers: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image: (the crop the model saw, (3, H, W) in [0, 1]; rollout grid; last-block grid).

    Uses the explicit-softmax path (model.attention_maps), batch by batch, so only one
    batch's N x N matrices are held at a time.
    """
    from visualize import attention_rollout, last_layer_attention

    model = model.eval().to(device)
    for images, _ in image_loader(model, paths, batch_size, workers):
        maps = model.attention_maps(images.to(device))
        rollout = attention_rollout(maps).cpu()
        last = last_layer_attention(maps).cpu()
        yield from zip(unnormalize(images), rollout, last, strict=True)


def grad_cam_maps(model: VisionTransformer, paths: list[Path], device: torch.device,
                  target_classes: list[int], block: int = -1, batch_size: int = 32,
                  workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (the crop the model saw, (3, H, W) in [0, 1]; its Grad-CAM map for
    target_classes[i] at blocks[block], (H, W) in [0, 1], as grad_cam.vit_grad_cam)."""
    from grad_cam import vit_grad_cam

    model = model.eval().to(device)
    start = 0
    for images, _ in image_loader(model, paths, batch_size, workers):
        targets = target_classes[start:start + len(images)]
        start += len(images)
        maps = vit_grad_cam(model, images.to(device), targets, block).cpu()
        yield from zip(unnormalize(images), maps, strict=True)


# --------------------------------------------------------------------------- output


def top_classes(probs: torch.Tensor, class_names: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probs.topk(min(k, len(class_names)))
    return [(class_names[i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def print_text(paths: list[Path], probs: torch.Tensor, class_names: list[str],
               topk: int | None) -> None:
    if len(paths) == 1:
        if topk is None:  # the reproduced repository's output: every class, in class order
            rows = list(zip(class_names, probs[0].tolist(), strict=True))
        else:
            rows = top_classes(probs[0], class_names, topk)
        for name, prob in rows:
            print(f"class: {name:<10}  prob: {prob:.4f}")
        best = int(probs[0].argmax())
        print(f"predicted: {class_names[best]} (prob {probs[0, best]:.4f})")
        return
    for path, row in zip(paths, probs, strict=True):
        print(path)
        for name, prob in top_classes(row, class_names, topk or 3):
            print(f"  {name:<10}  {prob:.4f}")


def print_json(paths: list[Path], probs: torch.Tensor, class_names: list[str],
               topk: int | None) -> None:
    k = topk or (len(class_names) if len(paths) == 1 else 3)
    for path, row in zip(paths, probs, strict=True):
        top = top_classes(row, class_names, k)
        print(json.dumps({"path": str(path), "predicted": top[0][0], "prob": top[0][1],
                          "topk": [{"class": name, "prob": prob} for name, prob in top]}))


def prediction_figure(paths: list[Path], probs: torch.Tensor, class_names: list[str]):
    """One image with the repository's title, or a grid whose titles are green where the
    folder name agrees with the prediction and red where it names another class."""
    from visualize import plot_prediction_grid

    best = probs.argmax(dim=1).tolist()
    if len(paths) == 1:
        title = f"class: {class_names[best[0]]}   prob: {probs[0, best[0]]:.3f}"
        return plot_prediction_grid([open_rgb(paths[0], exif_transpose=True)], [title],
                                    columns=1, cell=5.0)
    shown = paths[:MAX_GRID]
    titles, colours = [], []
    for path, b, row in zip(shown, best, probs, strict=False):
        name = path.name if len(path.name) <= 22 else path.name[:19] + "..."
        titles.append(f"{class_names[b]} {row[b]:.2f}\n{name}")
        folder = path.parent.name
        colours.append("black" if folder not in class_names
                       else "green" if folder == class_names[b] else "red")
    return plot_prediction_grid([open_rgb(p, exif_transpose=True) for p in shown], titles,
                                colours, columns=4)


def check_figure_path(target: str, flag: str,
                      suffixes: tuple[str, ...] = FIGURE_SUFFIXES) -> Path:
    """A file to save a figure (or another output whose kind its suffix names) in; checked
    before any work. By default the suffixes matplotlib writes."""
    path = check_output_file(target, flag)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {target} needs one of the suffixes {', '.join(suffixes)}"
                        f" (e.g. {path.with_suffix(suffixes[0])}).")
    return path


def figure_outputs(target: str, paths: list[Path], flag: str = "--attention",
                   kind: str = "attention") -> list[Path]:
    """Where each image's figure of `flag` goes: the file itself for one image, else a
    folder of <name>.<kind>.png."""
    target_path = Path(target)
    if target_path.suffix.lower() in FIGURE_SUFFIXES:
        if len(paths) > 1:
            raise UserError(f"{flag} {target} names one file but {len(paths)} images were "
                            f"given; pass a folder instead.")
        return [check_output_file(target_path, flag)]
    if target_path.exists() and not target_path.is_dir():
        raise UserError(f"{flag} {target} is a file; for {len(paths)} images pass a "
                        f"folder (or a {', '.join(FIGURE_SUFFIXES)} file for one image).")
    check_output_dir(target_path, flag)
    outputs, used = [], set()
    for path in paths:
        name = f"{path.stem}.{kind}.png"
        if name in used:  # the same file name in two folders
            name = f"{path.parent.name}_{path.stem}.{kind}.png"
        used.add(name)
        outputs.append(target_path / name)
    return outputs


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    # With --json, stdout carries the JSON lines alone; every notice goes to stderr.
    notices = sys.stderr if args.json else sys.stdout
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if args.topk is not None and args.topk < 1:
        raise UserError("--topk must be at least 1.")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more.")
    if not args.grad_cam and (args.target_class is not None or args.cam_layer != -1):
        raise UserError("--target-class and --cam-layer choose the map of --grad-cam; add "
                        "--grad-cam PATH.")
    if args.save_fig:
        check_figure_path(args.save_fig, "--save-fig")
    paths, unreadable = collect_images(args.images)
    if not paths:
        if len(unreadable) == 1:
            path, why = unreadable[0]
            raise UserError(f"{path} cannot be read as an image ({why}).")
        raise UserError(f"None of the {len(unreadable)} image files could be read "
                        f"(first: {unreadable[0][0]}: {unreadable[0][1]}).")
    for path, why in unreadable:
        print(f"warning: skipping {path}: cannot be read as an image ({why}).", file=sys.stderr)
    attention_paths = figure_outputs(args.attention, paths) if args.attention else []
    grad_cam_paths = (figure_outputs(args.grad_cam, paths, "--grad-cam", "gradcam")
                      if args.grad_cam else [])

    with contextlib.redirect_stdout(notices):  # select_device's CPU fallback notice
        device = select_device(args.device)
    model, class_names = load_classifier(resolve_weights(args.weights), args.class_indices,
                                         args.model_name)
    cam_target = check_grad_cam_flags(args, model, class_names)
    probs = predict_probs(model, paths, device, args.batch_size, args.workers)
    if args.json:
        print_json(paths, probs, class_names, args.topk)
    else:
        print_text(paths, probs, class_names, args.topk)

    if args.save_fig or args.show:
        from visualize import save_figure, show

        fig = prediction_figure(paths, probs, class_names)
        if args.save_fig:
            written = save_figure(fig, args.save_fig)
            more = f" (the first {MAX_GRID} of {len(paths)})" if len(paths) > MAX_GRID else ""
            print(f"Figure saved to {written}{more}", file=notices)
        if args.show:
            show(fig)
    if attention_paths:
        from visualize import plot_attention, save_figure

        best = probs.argmax(dim=1).tolist()
        grids = attention_grids(model, paths, device, args.batch_size, args.workers)
        for i, (crop, rollout, last) in enumerate(grids):
            title = f"{paths[i].name}: {class_names[best[i]]} ({probs[i, best[i]]:.2f})"
            save_figure(plot_attention(crop, rollout, last, title), attention_paths[i])
        where = attention_paths[0] if len(attention_paths) == 1 else attention_paths[0].parent
        print(f"Attention maps saved to {where}", file=notices)
    if grad_cam_paths:
        targets = ([cam_target] * len(paths) if cam_target is not None
                   else probs.argmax(dim=1).tolist())
        save_grad_cam_figures(model, paths, probs, class_names, targets, args, device,
                              grad_cam_paths)
        where = grad_cam_paths[0] if len(grad_cam_paths) == 1 else grad_cam_paths[0].parent
        print(f"Grad-CAM maps saved to {where}", file=notices)
    return 0


def check_grad_cam_flags(args: argparse.Namespace, model: VisionTransformer,
                         class_names: list[str]) -> int | None:
    """--target-class as a class index (None: each image's prediction); --cam-layer in range."""
    depth = len(model.blocks)
    if not -depth <= args.cam_layer < depth:
        raise UserError(f"--cam-layer {args.cam_layer} is outside the model's {depth} blocks; "
                        f"pass {-depth}..{depth - 1}.")
    if args.target_class is None:
        return None
    if args.target_class not in class_names:
        raise UserError(f"--target-class {args.target_class} is not one of the model's "
                        f"classes: {', '.join(class_names)}.")
    return class_names.index(args.target_class)


def grad_cam_title(class_name: str, cam: torch.Tensor, block: int | None = None) -> str:
    """The caption of a Grad-CAM map: its class, its block when one was chosen, and whether
    the map is empty."""
    title = f"Grad-CAM: {class_name}" + (f" (block {block})" if block is not None else "")
    if cam.max() == 0:  # ReLU(Eq. 2) left nothing: no patch raises this class's score
        title += ", all zero"
    return title


def grad_cam_figure(crop: torch.Tensor, cam: torch.Tensor, title: str, cam_title: str):
    """The crop the model saw beside it with its Grad-CAM map as a heat map."""
    from grad_cam import overlay_on_crop
    from visualize import plot_prediction_grid

    picture = crop.permute(1, 2, 0).clamp(0, 1).numpy()
    fig = plot_prediction_grid([picture, overlay_on_crop(crop, cam)], ["input", cam_title],
                               columns=2, cell=3.4)
    fig.suptitle(title)
    return fig


def save_grad_cam_figures(model: VisionTransformer, paths: list[Path], probs: torch.Tensor,
                          class_names: list[str], targets: list[int], args: argparse.Namespace,
                          device: torch.device, outputs: list[Path]) -> None:
    from visualize import save_figure

    best = probs.argmax(dim=1).tolist()
    maps = grad_cam_maps(model, paths, device, targets, args.cam_layer, args.batch_size,
                         args.workers)
    for i, (crop, cam) in enumerate(maps):
        title = f"{paths[i].name}: {class_names[best[i]]} ({probs[i, best[i]]:.2f})"
        cam_title = grad_cam_title(class_names[targets[i]], cam, args.cam_layer)
        save_figure(grad_cam_figure(crop, cam, title, cam_title), outputs[i])


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
