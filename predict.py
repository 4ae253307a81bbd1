"""Classify an image with a trained checkpoint and print every class's probability.

    python predict.py flower_photos/tulips/10791227_7168491604.jpg
    python predict.py IMAGE --weights weights/model-9.pth --save-fig prediction.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from my_dataset import build_transforms, check_image, open_rgb
from utils import UserError, find_checkpoint, read_class_indices, select_device
from vit_model import VisionTransformer, create_model, list_models
from weights import WeightsError, read_weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict the class of an image.")
    parser.add_argument("image", help="image file to classify")
    parser.add_argument("--weights", default=None,
                        help="checkpoint (default: best.pth in ./weights, else the newest "
                             "model-*.pth there)")
    parser.add_argument("--class-indices", default=None,
                        help="class_indices.json, needed only for weights that do not name "
                             "their classes (default: beside the weights, else ./)")
    parser.add_argument("--model-name", default="vit_base_patch16_224_in21k",
                        choices=list_models(), metavar="NAME",
                        help="architecture, for weights that do not name it")
    parser.add_argument("--device", default="cuda:0",
                        help="cuda:N, cpu or mps; falls back to the CPU when CUDA is absent")
    parser.add_argument("--save-fig", default=None, metavar="PATH",
                        help="save the image with the prediction as its title")
    parser.add_argument("--show", action="store_true", help="open a window with the figure")
    return parser


def resolve_weights(path: str | None) -> Path:
    if path is None:
        found = find_checkpoint("weights")
        if found is None:
            raise UserError("No checkpoint in ./weights; train one (python train.py, or "
                            "python train.py --demo) or pass --weights.")
        return found
    if not Path(path).is_file():
        raise UserError(f"Weights file {path} does not exist.")
    return Path(path)


def load_classifier(weights_path: Path, class_indices: str | None = None,
                    model_name: str = "vit_base_patch16_224_in21k"
                    ) -> tuple[VisionTransformer, list[str]]:
    """Rebuild the model a checkpoint was trained as, with its class names."""
    weights = read_weights(weights_path)
    state_dict = weights.state_dict
    class_names = weights.class_names
    if class_names is None:
        candidates = [Path(class_indices)] if class_indices else [
            weights_path.parent / "class_indices.json", Path("class_indices.json")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"{weights_path} does not name its classes and no "
                            f"class_indices.json was found; pass --class-indices.")
        class_names = read_class_indices(found)
    if weights.format == "this project":
        model = VisionTransformer(**weights.model_args)
    else:  # a bare state dict: the architecture comes from --model-name and the file's shapes
        overrides = dict(num_classes=len(class_names),
                         has_logits="pre_logits.fc.weight" in state_dict)
        overrides.update({k: v for k, v in weights.model_args.items() if k == "layer_norm_eps"})
        if "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict:
            patch = state_dict["patch_embed.proj.weight"].shape[-1]
            grid = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5))
            overrides["img_size"] = grid * patch
        model = create_model(model_name, **overrides)
    head = state_dict.get("head.weight")
    if head is not None and head.shape[0] != len(class_names):
        raise UserError(f"{weights_path} has a {head.shape[0]}-class head but "
                        f"{len(class_names)} class names were given.")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise UserError(f"{weights_path} does not fit {model_name}: "
                        f"{str(err).splitlines()[1].strip()}") from None
    if head is not None and not head.any():
        print(f"warning: the head in {weights_path} is all zeros (as in the ImageNet-21k "
              f"release); every class gets the same probability. Fine-tune it first.",
              file=sys.stderr)
    return model.eval(), class_names


@torch.no_grad()
def predict_image(model: VisionTransformer, image_path: str | Path,
                  device: torch.device) -> torch.Tensor:
    """Class probabilities of one image, with the report's evaluation transform."""
    transform = build_transforms(model.patch_embed.img_size, train=False)
    image = transform(open_rgb(image_path)).unsqueeze(0).to(device)  # (1, 3, H, W)
    return torch.softmax(model(image), dim=1)[0].cpu()


def save_figure(image_path: str | Path, title: str, out: str | None, show: bool) -> None:
    import matplotlib
    if not show:
        matplotlib.use("Agg")  # no display needed to write a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.imshow(open_rgb(image_path))
    ax.set_title(title)
    ax.axis("off")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight", dpi=100)
        print(f"Figure saved to {out}")
    if show:
        plt.show()
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    image_path = Path(args.image)
    if not image_path.is_file():
        raise UserError(f"Image {image_path} does not exist.")
    problem = check_image(image_path)
    if problem is not None:
        raise UserError(f"{image_path} cannot be read as an image ({problem}).")
    device = select_device(args.device)
    model, class_names = load_classifier(resolve_weights(args.weights), args.class_indices,
                                         args.model_name)
    probs = predict_image(model.to(device), image_path, device)
    for name, prob in zip(class_names, probs.tolist(), strict=True):
        print(f"class: {name:<10}  prob: {prob:.4f}")
    best = int(probs.argmax())
    print(f"predicted: {class_names[best]} (prob {probs[best]:.4f})")
    if args.save_fig or args.show:
        save_figure(image_path, f"class: {class_names[best]}   prob: {probs[best]:.3f}",
                    args.save_fig, args.show)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (UserError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
