"""vit_model.py: sizes, the two attention paths, initialisation, state dicts, timm parity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from weight_files import TINY

import weights
from vit_model import (
    DropPath,
    PatchEmbed,
    VisionTransformer,
    create_model,
    list_models,
    vit_base_patch16_224,
    vit_base_patch16_224_in21k,
)


def tiny(**overrides) -> VisionTransformer:
    return VisionTransformer(**{**TINY, "num_classes": 5, **overrides})


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every parameter with random values, so no test leans on the zero head
    or the unit LayerNorm of the default initialisation. (Not weight_files.randomize_, which
    draws at other scales and leaves the model in eval mode: tests here set the mode.)"""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm_scale = name.endswith("weight") and param.ndim == 1
        param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    return model


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize(("name", "overrides", "expected"), [
    ("vit_base_patch16_224", {}, 86_567_656),
    ("vit_base_patch16_224_in21k", {}, 103_186_515),
    ("vit_base_patch16_224", {"num_classes": 0}, 85_798_656),
    ("vit_base_patch16_224_in21k", {"num_classes": 5, "has_logits": False}, 85_802_501),
])
def test_vit_b16_parameter_counts(name, overrides, expected):
    model = create_model(name, **overrides)
    assert num_params(model) == expected


def test_vit_b16_in21k_shapes_and_one_full_size_forward():
    model = create_model("vit_base_patch16_224_in21k", num_classes=5, has_logits=False).eval()
    assert model.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert model.pos_embed.shape == (1, 197, 768)
    assert model.blocks[0].attn.qkv.weight.shape == (2304, 768)
    assert model.blocks[0].mlp.fc1.weight.shape == (3072, 768)
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 12
    assert model.norm.eps == 1e-6
    assert isinstance(model.pre_logits, nn.Identity)
    # The only full-size forward pass of the suite.
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


def test_has_logits_overrides():
    with_logits = create_model("vit_base_patch16_224", depth=1, num_classes=5, has_logits=True)
    assert isinstance(with_logits.pre_logits, nn.Sequential)
    assert with_logits.pre_logits.fc.weight.shape == (768, 768)
    assert isinstance(with_logits.pre_logits.act, nn.Tanh)
    assert "pre_logits.fc.weight" in with_logits.state_dict()

    without = create_model("vit_base_patch16_224_in21k", depth=1, num_classes=5, has_logits=False)
    assert isinstance(without.pre_logits, nn.Identity)
    assert not any(k.startswith("pre_logits.") for k in without.state_dict())
    assert without.head.weight.shape == (5, 768)

    # Left alone, the in21k factory has pre-logits and the 1k factory has none.
    in21k = create_model("vit_base_patch16_224_in21k", depth=1, num_classes=5)
    assert in21k.pre_logits.fc.weight.shape == (768, 768)
    plain = create_model("vit_base_patch16_224", depth=1, num_classes=5)
    assert isinstance(plain.pre_logits, nn.Identity)


def test_has_logits_says_whether_a_pre_logits_layer_exists():
    small = dict(depth=1, num_classes=5)
    assert create_model("vit_base_patch16_224_in21k", **small).has_logits is True
    assert create_model("vit_base_patch16_224_in21k", **small, has_logits=False).has_logits is False
    assert create_model("vit_base_patch16_224", **small).has_logits is False
    assert create_model("vit_base_patch16_224", **small, has_logits=True).has_logits is True
    assert tiny(representation_size=16).has_logits and not tiny().has_logits


def test_reproduced_train_script_loads_the_in21k_file_without_head_and_pre_logits():
    """The reproduced train.py: build the factory with these two arguments, drop the keys
    has_logits says do not fit from the in21k file's state dict, load with strict=False."""
    model = vit_base_patch16_224_in21k(num_classes=5, has_logits=False)
    assert model.has_logits is False and model.head.out_features == 5
    # The in21k file's layout: this model's keys plus pre-logits and a 21843-class head.
    full = dict(model.state_dict())
    full.update({"pre_logits.fc.weight": torch.zeros(768, 768),
                 "pre_logits.fc.bias": torch.zeros(768),
                 "head.weight": torch.zeros(21843, 768), "head.bias": torch.zeros(21843)})
    drop = ["head.weight", "head.bias"]
    if not model.has_logits:
        drop += ["pre_logits.fc.weight", "pre_logits.fc.bias"]
    for key in drop:
        del full[key]
    result = model.load_state_dict(full, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    # The grad-CAM script builds the 1k model with no arguments.
    assert vit_base_patch16_224(depth=1).head.out_features == 1000


def test_factories_take_num_classes_and_has_logits_by_position_as_the_reproduced_ones():
    model = vit_base_patch16_224_in21k(5, False, depth=1)
    assert (model.head.out_features, model.has_logits) == (5, False)
    model = vit_base_patch16_224_in21k(depth=1)
    assert (model.head.out_features, model.has_logits) == (21843, True)
    assert model.pre_logits.fc.out_features == 768
    assert vit_base_patch16_224(3, depth=1).head.out_features == 3
    with pytest.raises(TypeError):
        vit_base_patch16_224(3, num_classes=4)


def test_reset_classifier_gives_a_zero_head_that_checkpoints_rebuild():
    model = randomize_(tiny(num_classes=1000))
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.num_classes == 7
    assert all(torch.count_nonzero(p) == 0 for p in model.head.parameters())
    # The arguments a checkpoint stores build the model as it is now.
    rebuilt = VisionTransformer(**model.model_args)
    rebuilt.load_state_dict(model.state_dict())
    model.reset_classifier(0)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    assert model.eval()(images).shape == (2, model.num_features)
    assert VisionTransformer(**model.model_args).num_classes == 0
    model.to(torch.float64).reset_classifier(3)
    assert model.head.weight.dtype == torch.float64  # made where the model lives


def test_drop_path_says_its_rate():
    assert repr(DropPath(0.1)) == "DropPath(drop_prob=0.1)"


def test_img_size_override_resizes_the_position_embedding():
    model = create_model("vit_base_patch16_224", img_size=64, depth=1, num_classes=3).eval()
    assert model.patch_embed.num_patches == 16
    assert model.pos_embed.shape == (1, 17, 768)  # 4x4 patches + the class token
    assert model.model_args["img_size"] == 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_patch_embed_sizes_are_height_width_pairs():
    """(h, w) pairs as timm and the reproduced code have them; an int side is a square."""
    model = tiny()
    assert model.patch_embed.img_size == (32, 32) and model.patch_embed.patch_size == (8, 8)
    assert model.patch_embed.grid_size == (4, 4) and model.image_size == 32
    assert model.model_args["img_size"] == 32 and model.model_args["patch_size"] == 8
    # The grad-CAM script of the reproduced repository folds the tokens back this way.
    rows = model.patch_embed.img_size[0] // model.patch_embed.patch_size[0]
    cols = model.patch_embed.img_size[1] // model.patch_embed.patch_size[1]
    with torch.no_grad():
        tokens = model.forward_features(images())                      # (B, 1 + N, C)
    assert tokens[:, 1:].reshape(2, rows, cols, 64).shape == (2, 4, 4, 64)

    wide = PatchEmbed(img_size=(16, 40), patch_size=8, embed_dim=12)
    assert wide.grid_size == (2, 5) and wide.num_patches == 10
    assert wide(torch.randn(1, 3, 16, 40)).shape == (1, 10, 12)
    with pytest.raises(ValueError, match="multiple"):
        PatchEmbed(img_size=(16, 44), patch_size=8)


def test_wrong_input_size_raises_a_clear_value_error():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"48x48.*32x32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"resize it to 32x32 or build the model with "
                                          r"img_size=\(32, 40\)"):
        model(torch.randn(1, 3, 32, 40))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError) as info:
        create_model("vit_gigantic_patch1_9000")
    message = str(info.value)
    assert "vit_gigantic_patch1_9000" in message
    for name in list_models():
        assert name in message
    assert "vit_base_patch16_224_in21k" in list_models()
    assert "vit_demo_patch8_64" in list_models()


def test_demo_model_is_small_and_64_px():
    model = create_model("vit_demo_patch8_64", num_classes=5)
    assert model.image_size == 64 and model.patch_embed.patch_size == (8, 8)
    assert model.pos_embed.shape == (1, 65, 128)
    assert 0.5e6 < num_params(model) < 1.0e6


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("train_mode", [False, True])
def test_fused_and_explicit_attention_agree(train_mode):
    model = randomize_(tiny(representation_size=32)).train(train_mode)
    x = images()
    model.fused_attn = True
    assert all(block.attn.fused_attn for block in model.blocks)
    fused = model(x)
    model.fused_attn = False
    assert not any(block.attn.fused_attn for block in model.blocks)
    explicit = model(x)
    assert fused.abs().max() > 0.1  # random weights: a real comparison, not 0 == 0
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_attention_maps_shapes_rows_and_values():
    model = randomize_(tiny(depth=3)).eval()
    x = images(batch=2)
    maps = model.attention_maps(x)
    assert len(maps) == 3
    for attn in maps:
        assert attn.shape == (2, 4, 17, 17)  # (B, heads, 1 + N, 1 + N)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17), rtol=0, atol=1e-5)
    # Far from uniform with random weights, so the maps say something.
    assert (maps[0] - 1 / 17).abs().max() > 0.05

    # The first block's map recomputed by hand: softmax(q k^T / sqrt(d)) per head.
    with torch.no_grad():
        tokens = model.embed(x)
        qkv = model.blocks[0].attn.qkv(model.blocks[0].norm1(tokens))  # (B, N, 3C)
        q, k, _ = qkv.reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)   # each (B, nh, N, hd)
        expected = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(-1)
    torch.testing.assert_close(maps[0], expected, rtol=1e-5, atol=1e-6)

    # attention_maps leaves the model's forward path as it was.
    assert model.fused_attn


# --------------------------------------------------------------------------- initialisation

def test_jax_initialisation():
    torch.manual_seed(0)
    model = create_model("vit_demo_patch8_64", num_classes=5, has_logits=True)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert not model.cls_token.any()
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_embed.mean().abs().item() < 0.002

    linear_biases = {n: m.bias for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    mlp = {n: b for n, b in linear_biases.items() if ".mlp." in n}
    other = {n: b for n, b in linear_biases.items() if ".mlp." not in n}
    assert len(mlp) == 2 * 4 and "pre_logits.fc" in other and "blocks.0.attn.qkv" in other
    for name, bias in mlp.items():
        assert bias.abs().max() < 1e-5, name   # normal(std 1e-6): tiny ...
        assert (bias != 0).all(), name         # ... but not zero
    for name, bias in other.items():
        assert not bias.any(), name

    # Xavier-uniform weights stay inside their bound and fill it.
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    # Lecun-normal patch embedding: std sqrt(1 / fan_in), truncated at 2 std.
    proj = model.patch_embed.proj.weight
    fan_in = proj[0].numel()
    assert proj.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.05)
    assert not model.patch_embed.proj.bias.any()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any()


def test_zero_head_gives_a_uniform_prediction():
    model = create_model("vit_demo_patch8_64", num_classes=5).eval()
    with torch.no_grad():
        probs = model(torch.randn(2, 3, 64, 64)).softmax(-1)
    torch.testing.assert_close(probs, torch.full((2, 5), 0.2))


# --------------------------------------------------------------------------- training behaviour

def test_every_parameter_receives_a_gradient():
    model = randomize_(tiny(representation_size=32)).train()
    loss = nn.functional.cross_entropy(model(images(batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_drop_path_only_in_train_mode():
    torch.manual_seed(0)
    model = randomize_(tiny(drop_path_rate=0.9, depth=3))
    reference = randomize_(tiny(drop_path_rate=0.0, depth=3))
    x = images(batch=16)

    model.eval()
    with torch.no_grad():
        first, second, plain = model(x), model(x), reference.eval()(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, plain, rtol=1e-6, atol=1e-6)

    model.train()
    with torch.no_grad():
        trained_a, trained_b = model(x), model(x)
    assert not torch.allclose(trained_a, first, atol=1e-4)
    assert not torch.allclose(trained_a, trained_b, atol=1e-4)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(1000, 3, 4)
    out = layer(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped whole
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(layer.eval()(x), x)


def test_drop_path_rate_rises_linearly_over_the_blocks():
    model = tiny(depth=5, drop_path_rate=0.4)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# --------------------------------------------------------------------------- state dicts

def test_state_dict_round_trip_through_a_file(tmp_path):
    source = randomize_(tiny(representation_size=32), seed=3).eval()
    path = tmp_path / "model.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(123)
    fresh = tiny(representation_size=32).eval()
    x = images()
    assert not torch.allclose(fresh(x), source(x))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))


def test_timm_state_dict_loads_strictly_and_gives_the_same_logits():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    theirs = randomize_(TimmViT(**TINY, num_classes=5), seed=7).eval()
    ours = tiny().eval()
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = images()
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_in21k_layout_fits_a_5_class_model_without_pre_logits():
    small = dict(TINY, representation_size=64)
    torch.manual_seed(0)
    pretrained = randomize_(create_model("vit_base_patch16_224_in21k", **small)).eval()
    nn.init.zeros_(pretrained.head.weight)  # as Google's in21k release
    nn.init.zeros_(pretrained.head.bias)
    state_dict = pretrained.state_dict()
    assert state_dict["head.weight"].shape == (21843, 64)
    assert state_dict["pre_logits.fc.weight"].shape == (64, 64)

    model = create_model("vit_base_patch16_224_in21k", **TINY, num_classes=5,
                         has_logits=False).eval()
    fitted, report = weights.fit_state_dict(model, state_dict)
    dropped = {"pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"}
    assert set(report.left_out) == dropped
    assert set(fitted) == set(state_dict) - dropped
    assert "pre_logits" in str(report) and "head" in str(report)

    result = model.load_state_dict(fitted, strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"}
    assert not result.unexpected_keys
    for key, value in fitted.items():
        assert torch.equal(model.state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), pretrained.forward_features(x))
        assert model(x).shape == (2, 5)
