"""flops.py: the counts equal the architecture's formulas (and fvcore, where it installs)."""

from __future__ import annotations

import pytest
import torch

import flops
from vit_model import Attention, create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def hand_macs(*, img_size: int, patch_size: int, embed_dim: int, depth: int,
              num_classes: int, representation_size: int | None = None, **_) -> dict[str, int]:
    """Multiply-adds per image of each stage, from the ViT's shapes (N patches, T = N + 1
    tokens, width C, MLP width 4C); LayerNorm, softmax, GELU and additions count 0."""
    n = (img_size // patch_size) ** 2
    t = n + 1
    c = embed_dim
    patch_embed = n * c * 3 * patch_size * patch_size  # conv = a (3 p p -> C) map per patch
    qkv = t * 3 * c * c
    scores_and_mix = 2 * t * t * c                      # q k^T, then (attention) v, all heads
    proj = t * c * c
    mlp = 2 * t * c * 4 * c                             # fc1 (C -> 4C) and fc2 (4C -> C)
    if representation_size:
        head = c * representation_size + representation_size * num_classes  # class token only
    else:
        head = c * num_classes
    attention = qkv + scores_and_mix + proj
    return {"patch": patch_embed, "attention": attention, "mlp": mlp,
            "total": patch_embed + depth * (attention + mlp) + head, "head": head}


def table(model_name: str, **overrides) -> dict[str, tuple[int, int]]:
    model = flops.build_on_meta(model_name, **overrides)
    size = overrides.get("img_size", 224)
    return {label: (params, macs) for label, params, macs in flops.stage_table(model,
                                                                               (size, size))}


def test_tiny_stages_equal_the_formulas():
    expected = hand_macs(**TINY)
    rows = table("vit_demo_patch8_64", **TINY)
    assert rows["patch embedding (+ class token, positions)"][1] == expected["patch"]
    assert rows["attention, one block (LN + MSA)"][1] == expected["attention"]
    assert rows["MLP, one block (LN + MLP)"][1] == expected["mlp"]
    assert rows["attention, all 2 blocks"][1] == 2 * expected["attention"]
    assert rows["MLP, all 2 blocks"][1] == 2 * expected["mlp"]
    assert rows["head (LN + pre-logits + head)"][1] == expected["head"]
    assert rows["total"][1] == expected["total"]


def test_parameters_per_stage_add_up_to_the_model():
    model = create_model("vit_demo_patch8_64", **TINY)
    rows = table("vit_demo_patch8_64", **TINY)
    c = TINY["embed_dim"]
    # LN (2C) + qkv (3C^2 + 3C) + proj (C^2 + C); LN (2C) + fc1 (4C^2 + 4C) + fc2 (4C^2 + C)
    assert rows["attention, one block (LN + MSA)"][0] == 4 * c * c + 6 * c
    assert rows["MLP, one block (LN + MLP)"][0] == 8 * c * c + 7 * c
    stage_sum = sum(rows[label][0] for label in ("patch embedding (+ class token, positions)",
                                                  "attention, all 2 blocks", "MLP, all 2 blocks",
                                                  "head (LN + pre-logits + head)"))
    assert stage_sum == rows["total"][0] == sum(p.numel() for p in model.parameters())


def test_vit_b16_at_224_is_17_56_g():
    expected = hand_macs(img_size=224, patch_size=16, embed_dim=768, depth=12, num_classes=1000)
    assert expected["total"] == 17_563_828_224  # the formulas themselves: ~17.56 G
    assert table("vit_base_patch16_224")["total"][1] == expected["total"]


def test_pre_logits_are_counted_in_the_head():
    expected = hand_macs(img_size=224, patch_size=16, embed_dim=768, depth=12,
                         num_classes=21843, representation_size=768)
    rows = table("vit_base_patch16_224_in21k")
    assert rows["head (LN + pre-logits + head)"][1] == expected["head"]
    assert rows["total"][1] == expected["total"]


def test_attention_comparison_equals_the_formulas():
    batch, tokens, dim = 32, 1024, 512
    single, multi = flops.attention_comparison(dim, tokens, batch, num_heads=8)
    qkv, scores_and_mix, proj = tokens * 3 * dim * dim, 2 * tokens * tokens * dim, tokens * dim ** 2
    assert single == batch * (qkv + scores_and_mix)
    assert multi == batch * (qkv + scores_and_mix + proj)


def test_default_command_prints_both_numbers(capsys):
    assert flops.main([]) == 0
    out = capsys.readouterr().out
    assert "60,129,542,144" in out   # 32 * (1024*3*512^2 + 2*1024^2*512)
    assert "68,719,476,736" in out   # ... + 32 * 1024 * 512^2 for W_O
    assert "multiply-add = 1 FLOP" in out


def test_model_command_prints_the_total_and_the_convention(capsys):
    assert flops.main(["--model-name", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[-2:] == ["17.56", "G"]
    assert "fvcore's convention" in out


@pytest.mark.parametrize("img_size", ["60", "0", "-8"])
def test_bad_img_size_exits_2_with_one_line(capsys, img_size):
    assert flops.main(["--model-name", "vit_demo_patch8_64", "--img-size", img_size]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: --img-size {img_size} must be a positive multiple")


def test_img_size_without_model_exits_2(capsys):
    assert flops.main(["--img-size", "224"]) == 2
    assert capsys.readouterr().err.startswith("error: --img-size and --num-classes need")


def test_other_img_size_and_classes(capsys):
    rows = table("vit_demo_patch8_64", img_size=96, num_classes=5)
    assert rows["total"][1] == hand_macs(img_size=96, patch_size=8, embed_dim=128, depth=4,
                                         num_classes=5)["total"]
    assert flops.main(["--model-name", "vit_demo_patch8_64", "--img-size", "96",
                       "--num-classes", "5"]) == 0
    assert "12x12 patches of 8x8, 145 tokens, 5 classes" in capsys.readouterr().out


# --------------------------------------------------------------------------- fvcore


def fvcore_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """fvcore's count less its LayerNorm share (5 per element), which flops.py leaves out, as
    its output says; every other op fvcore counts here is a product or a convolution."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    analysis = fvcore_nn.FlopCountAnalysis(module, x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    assert set(by_op) <= {"linear", "conv", "matmul", "layer_norm"}, by_op
    return analysis.total() - by_op.get("layer_norm", 0)


def test_model_total_matches_fvcore():
    torch.manual_seed(0)
    model = create_model("vit_demo_patch8_64", fused_attn=False, **TINY).eval()
    theirs = fvcore_macs(model, torch.randn(1, 3, TINY["img_size"], TINY["img_size"]))
    ours = table("vit_demo_patch8_64", **TINY)["total"][1]
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_attention_comparison_matches_fvcore():
    batch, tokens, dim = 2, 16, 32
    single = Attention(dim, num_heads=1, fused_attn=False)
    single.proj = torch.nn.Identity()
    multi = Attention(dim, num_heads=8, fused_attn=False)
    x = torch.randn(batch, tokens, dim)
    theirs = [fvcore_macs(m, x) for m in (single, multi)]
    ours = flops.attention_comparison(dim, tokens, batch, num_heads=8)
    assert list(ours) == pytest.approx(theirs, rel=1e-6)
