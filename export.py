"""Export a checkpoint to TorchScript or ONNX, and check the export against PyTorch.

    python export.py --weights weights/best.pth --format torchscript --output vit.pt
    python export.py --weights weights/best.pth --format onnx --output vit.onnx

Without --format, the suffix of --output chooses it: .pt or .ts TorchScript, .onnx ONNX.

The exported model takes a float batch (B, 3, H, W), normalised as for training
(mean 0.5, std 0.5: pixels in [-1, 1]) after Resize + CenterCrop, and returns logits
(B, classes); the batch size is free. The class names, input size and normalisation
travel inside the file: `config.json` in the TorchScript archive (torch.jit.load(...,
_extra_files=...)), metadata_props in the ONNX model. After writing, the file is loaded
back and run on a random batch beside the PyTorch model; the largest absolute difference
of the logits is printed, and the command fails (exit 1) above --tolerance.

ONNX needs the optional packages onnx, onnxscript (torch's exporter) and onnxruntime
(the check): pip install onnx onnxscript onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from checkpoints import atomic_write_bytes
from cli import add_weights_flags, run_main
from errors import UserError, check_output_file, writing
from my_dataset import MEAN, STD
from predict import load_classifier, resolve_weights
from vit_model import VisionTransformer

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
TRACE_BATCH = 2  # the parity batch differs from it, which shows the batch size stays free
# The suffixes of each format's file, the first the one to suggest. Not .pth: in this
# project that names a checkpoint, which the commands would then try to read as weights.
FORMAT_SUFFIXES = {"torchscript": (".pt", ".ts"), "onnx": (".onnx",)}
FORMAT_LABELS = {"torchscript": "TorchScript", "onnx": "ONNX"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a checkpoint to TorchScript or ONNX.")
    add_weights_flags(parser)
    parser.add_argument("--format", choices=tuple(FORMAT_SUFFIXES), default=None,
                        help="default: the one --output's suffix names")
    parser.add_argument("--output", required=True,
                        help="file to write: .pt or .ts (TorchScript), .onnx (ONNX)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest absolute logit difference the parity check accepts")
    parser.add_argument("--check-batch", type=int, default=3,
                        help="images in the random parity-check batch")
    return parser


def export_config(model: VisionTransformer, class_names: list[str]) -> dict:
    return {"class_names": class_names, "img_size": model.image_size,
            "mean": list(MEAN), "std": list(STD), "input": "images (B, 3, H, W) float32",
            "output": "logits (B, classes)"}


def export_torchscript(model: VisionTransformer, example: torch.Tensor, config: dict,
                       output: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Trace (the model has no data-dependent control flow) and save; returns the reloaded
    file as a function, so the check runs what a user will load."""
    with warnings.catch_warnings():
        # The input-size check in PatchEmbed becomes a constant: right, the export has one
        # size. torch.jit's deprecation notice (torch.export is its successor) is noise here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        # Saved to memory, then written by Python: torch.jit.save's own file writer aborts
        # the interpreter when the disk fills up ("unexpected pos"), leaving a 0-byte file.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"config.json": json.dumps(config)})
        atomic_write_bytes(output, buffer.getvalue())
        loaded = torch.jit.load(str(output), map_location="cpu")
    return lambda x: loaded(x)


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def export_onnx(model: VisionTransformer, example: torch.Tensor, config: dict,
                output: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (example,), input_names=["images"],
                                    output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                                    dynamo=True, verbose=False)
    proto = program.model_proto
    for key, value in config.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    # One file without external data, so at most protobuf's 2 GB (ViT-L's 1.2 GB fits).
    atomic_write_bytes(output, proto.SerializeToString())
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


@torch.no_grad()
def check_parity(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor],
                 batch: torch.Tensor) -> float:
    """Largest absolute difference between the two models' outputs on batch."""
    expected = model(batch)
    got = exported(batch)
    if got.shape != expected.shape:
        raise RuntimeError(f"The export returns {tuple(got.shape)}, PyTorch "
                           f"{tuple(expected.shape)}.")
    return (got.float() - expected.float()).abs().max().item()


def export_format(output: Path, given: str | None) -> str:
    """The format to write: the one output's suffix names, which --format (given) must agree
    with; UserError for a suffix of no format, so a name never hides what the file holds."""
    suffix = output.suffix.lower()
    implied = next((name for name, suffixes in FORMAT_SUFFIXES.items() if suffix in suffixes),
                   None)
    choices = " or ".join(f"{' or '.join(suffixes)} ({FORMAT_LABELS[name]})"
                        for name, suffixes in FORMAT_SUFFIXES.items())
    if suffix == ".pth":
        raise UserError(f"--output {output}: .pth is the suffix of this project's checkpoints; "
                        f"name the export {choices}.")
    if implied is None:
        raise UserError(f"--output {output}: the suffix {suffix or '(none)'} names no export "
                        f"format; name the file {choices}.")
    if given is not None and given != implied:
        raise UserError(f"--output {output} ends in {suffix}, which means "
                        f"{FORMAT_LABELS[implied]}, but --format is {given}; name it "
                        f"{FORMAT_SUFFIXES[given][0]} or leave --format out.")
    return implied


def refuse_overwriting_weights(output: Path, weights_path: Path) -> None:
    """UserError when output is the weights file itself (by any path, symlink or hard link):
    the export would replace the checkpoint it was made from."""
    try:
        same = output.exists() and os.path.samefile(output, weights_path)
    except OSError:  # unreadable: check_output_file and the weights reader say why
        same = False
    if same:
        raise UserError(f"--output {output} is the weights file {weights_path}; the export "
                        f"would replace the checkpoint. Name another file.")


def run(args: argparse.Namespace) -> int:
    if args.check_batch < 1:
        raise UserError("--check-batch must be at least 1.")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UserError(f"--tolerance must be a finite number of 0 or more, not {args.tolerance}.")
    output = check_output_file(args.output, "--output")
    weights_path = resolve_weights(args.weights)
    refuse_overwriting_weights(output, weights_path)
    output_format = export_format(output, args.format)
    if output_format == "onnx":
        missing = missing_onnx_packages()
        if missing:
            raise UserError(f"ONNX export needs the optional packages {', '.join(missing)}: "
                            f"pip install onnx onnxscript onnxruntime.")
    model, class_names = load_classifier(weights_path, args.class_indices, args.model_name)
    model = model.cpu().eval()
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, 3, size, size, generator=generator)
    with writing(output.parent):
        output.parent.mkdir(parents=True, exist_ok=True)
    config = export_config(model, class_names)
    if output_format == "torchscript":
        exported = export_torchscript(model, example, config, output)
    else:
        exported = export_onnx(model, example, config, output)
    print(f"Wrote {output} ({output_format}, {output.stat().st_size / 1e6:.1f} MB) from "
          f"{weights_path}.")

    batch = torch.randn(args.check_batch, 3, size, size, generator=generator)
    diff = check_parity(model, exported, batch)
    print(f"parity: max abs diff {diff:.3e} on a random batch of {args.check_batch} "
          f"(tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:  # also fails on NaN
        print(f"error: the export differs from PyTorch by {diff:.3e} > {args.tolerance:g}; "
              f"do not use {output}.", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
