"""Convert ViT weights of any supported format into this project's parameter names.

    python convert.py ViT-B_16.npz vit_base_patch16_224_in21k.pth
    python convert.py google/vit-base-patch16-224-in21k/ vit_in21k.pth \\
        --model-name vit_base_patch16_224_in21k

SRC is anything weights.read_weights reads (timm / reproduced-repository .pth,
.safetensors, Google .npz, a Hugging Face folder or file, torchvision). Without
--model-name DST is a plain state dict. With it, the model for the file is
built as weights.build_model_for says (the named model with the file's head,
pre-logits, resolution and stated arguments) and loaded with strict=True to
prove the weights fit; DST is then a checkpoint that rebuilds itself:
{"model", "model_args", "model_name", "class_names", "source_format"}.
"""

from __future__ import annotations

import argparse
import sys

from checkpoints import Checkpoint, save_checkpoint
from cli import run_main
from errors import check_output_file
from weights import describe_architecture, load_model_for, read_weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="weights file or Hugging Face model folder")
    parser.add_argument("dst", help="output .pth")
    parser.add_argument("--model-name", default=None,
                        help="a model of vit_model.py (e.g. vit_base_patch16_224_in21k) to build "
                             "and load the weights into with strict=True")
    return parser


def run(args: argparse.Namespace) -> int:
    dst = check_output_file(args.dst, "DST")  # before reading a file of hundreds of MB
    weights = read_weights(args.src)
    state_dict = weights.state_dict
    if args.model_name:
        model = load_model_for(weights, args.model_name)
        output = Checkpoint(model=state_dict, model_args=model.model_args,
                            model_name=args.model_name, class_names=weights.class_names,
                            source_format=weights.format)
    else:
        output = state_dict
    save_checkpoint(output, dst)
    fits = f"; loads into {args.model_name} with strict=True" if args.model_name else ""
    print(f"Wrote {args.dst}: {len(state_dict)} tensors from {weights.format}, "
          f"{describe_architecture(state_dict)}{fits}.")
    eps = weights.model_args.get("layer_norm_eps")
    if not args.model_name and eps is not None and eps != 1e-6:
        print(f"note: these weights were trained with layer_norm_eps={eps}, which a plain state "
              f"dict does not record; build the model with it, or convert with --model-name to "
              f"store it.", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
