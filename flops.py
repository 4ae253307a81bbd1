"""What a ViT costs: parameters and FLOPs, per stage, and why more heads cost nothing extra.

    python flops.py                                     # 1-head vs 8-head self-attention
    python flops.py --model-name vit_base_patch16_224   # per stage, 224 px: about 17.56 G
    python flops.py --model-name vit_base_patch16_224 --img-size 384

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matrix products and
convolutions) and reported in fvcore's convention: one multiply-add is one FLOP, half of
what FlopCounterMode counts. Only matrix products and convolutions are counted: softmax,
GELU and additions are not (nor by fvcore); fvcore's default also counts LayerNorm, 5 FLOPs
per element, which adds about 0.1% for ViT-B/16 (17.58 G instead of 17.56 G). The models are
built on the meta device, so nothing is computed and even ViT-H/14 is counted in a second.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cli import run_main
from errors import UserError
from vit_model import Attention, VisionTransformer, create_model, list_models

CONVENTION = ("one multiply-add = 1 FLOP (fvcore's convention); only matrix products and "
              "convolutions are counted")


def module_macs(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of one forward pass, per submodule name ('' is the whole module).

    A submodule's count includes its children's. The explicit attention path must be on:
    FlopCounterMode does not count scaled_dot_product_attention on the CPU or meta device.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    root = type(module).__name__
    counts = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            # FlopCounterMode counts 2 FLOPs per multiply-add (a multiply and an add).
            counts[name[len(root) + 1:]] = sum(ops.values()) // 2
    return counts


# --------------------------------------------------------------------------- attention


def attention_comparison(dim: int = 512, tokens: int = 1024, batch: int = 32,
                         num_heads: int = 8) -> tuple[int, int]:
    """FLOPs of single-head self-attention without its output projection W_O, and of
    num_heads-head attention with it, on a (batch, tokens, dim) input.

    The reproduced repository's flops.py makes this comparison: the heads split the width,
    so their products q k^T and (attention) v cost together what one full-width head costs,
    and the difference is W_O alone, tokens * dim * dim per image.
    """
    with torch.device("meta"):
        single = Attention(dim, num_heads=1, fused_attn=False)
        single.proj = nn.Identity()  # no W_O: plain self-attention
        multi = Attention(dim, num_heads=num_heads, fused_attn=False)
        x = torch.empty(batch, tokens, dim)
    return module_macs(single, x)[""], module_macs(multi, x)[""]


def print_attention_comparison() -> None:
    dim, tokens, batch, heads = 512, 1024, 32, 8
    single, multi = attention_comparison(dim, tokens, batch, heads)
    print(f"Input: batch {batch}, {tokens} tokens, width {dim}; {CONVENTION}.")
    for label, flops in (("Self-attention, 1 head, no output projection:", single),
                         (f"Multi-head attention, {heads} heads:", multi)):
        print(f"{label:<46} {flops:>14,} FLOPs ({flops / 1e9:.2f} G)")
    print(f"The {heads} heads split the width, so their products cost what one head costs; "
          f"the difference, {(multi - single) / 1e9:.2f} G, is the output projection W_O.")


# --------------------------------------------------------------------------- model


def build_on_meta(model_name: str, **overrides) -> VisionTransformer:
    """The model with its shapes but no storage, and with the explicit attention path."""
    with torch.device("meta"):
        return create_model(model_name, fused_attn=False, **overrides)


def stages(depth: int) -> list[tuple[str, list[str]]]:
    """(label, module or parameter names) of each stage. The 'one block' rows are block 0;
    the 'all blocks' rows sum every block, so the rows other than those add up to the total."""
    every = range(depth)
    return [
        ("patch embedding (+ class token, positions)", ["patch_embed", "cls_token", "pos_embed"]),
        ("attention, one block (LN + MSA)", ["blocks.0.norm1", "blocks.0.attn"]),
        ("MLP, one block (LN + MLP)", ["blocks.0.norm2", "blocks.0.mlp"]),
        (f"attention, all {depth} blocks", [f"blocks.{i}.{m}" for i in every
                                             for m in ("norm1", "attn")]),
        (f"MLP, all {depth} blocks", [f"blocks.{i}.{m}" for i in every
                                       for m in ("norm2", "mlp")]),
        ("head (LN + pre-logits + head)", ["norm", "pre_logits", "head"]),
    ]


def stage_table(model: VisionTransformer, img_size: tuple[int, int]
                ) -> list[tuple[str, int, int]]:
    """(stage, parameters, FLOPs per image) for each stage, then the total."""
    device = next(model.parameters()).device
    macs = module_macs(model, torch.empty(1, 3, *img_size, device=device))
    params = dict(model.named_parameters())

    def in_stage(name: str, prefixes: list[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    rows = []
    for label, prefixes in stages(len(model.blocks)):
        rows.append((label,
                     sum(p.numel() for n, p in params.items() if in_stage(n, prefixes)),
                     sum(macs.get(prefix, 0) for prefix in prefixes)))
    rows.append(("total", sum(p.numel() for p in params.values()), macs[""]))
    return rows


def human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def print_model_table(model_name: str, img_size: int | None, num_classes: int | None) -> None:
    overrides = {} if num_classes is None else {"num_classes": num_classes}
    model = build_on_meta(model_name, **overrides)
    patch_h, patch_w = model.patch_embed.patch_size  # PatchEmbed keeps (h, w) pairs
    if img_size is not None:
        if img_size <= 0 or img_size % patch_h or img_size % patch_w:
            patch = str(patch_h) if patch_h == patch_w else f"{patch_h}x{patch_w}"
            raise UserError(f"--img-size {img_size} must be a positive multiple of "
                            f"{model_name}'s patch size, {patch}.")
        model = build_on_meta(model_name, img_size=img_size, **overrides)
    size, grid = model.patch_embed.img_size, model.patch_embed.grid_size
    print(f"{model_name} at {size[0]}x{size[1]}: {grid[0]}x{grid[1]} patches of "
          f"{patch_h}x{patch_w}, {model.patch_embed.num_patches + 1} tokens, "
          f"{model.num_classes} classes.")
    print(f"FLOPs per image; {CONVENTION}.")
    print(f"{'stage':<44} {'params':>10} {'FLOPs':>10}")
    for label, params, flops in stage_table(model, size):
        print(f"{label:<44} {human(params):>10} {human(flops):>10}")


# --------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Without --model-name: the FLOPs of single-head against 8-head "
                    "self-attention. With it: the model's parameters and FLOPs per stage.")
    parser.add_argument("--model-name", default=None, choices=list_models(), metavar="NAME",
                        help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="input side in pixels, a multiple of the patch size (default: "
                             "the model's)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="outputs of the head, e.g. 5 for flower_photos (default: the "
                             "model's)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.model_name is None:
        if args.img_size is not None or args.num_classes is not None:
            raise UserError("--img-size and --num-classes need --model-name.")
        print_attention_comparison()
        return 0
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError("--num-classes must be at least 1.")
    print_model_table(args.model_name, args.img_size, args.num_classes)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
