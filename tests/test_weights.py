"""weights.py against the libraries that write each format.

Every foreign format is written by its own library (timm, torchvision, Hugging
Face transformers, safetensors; Google's .npz is written from the mapping and
read back by timm's own .npz loader) from a model with random weights, then
read here and compared by its outputs on the same input: a wrong mapping
changes the logits, so it cannot pass.
"""

from __future__ import annotations

import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from weight_files import (
    HF_LAYOUTS,
    TINY,
    SideEffect,
    assert_same_outputs,
    google_npz_arrays,
    hf_config,
    hf_files,
    images,
    ours,
    random_ours,
    randomize_,
    timm_vit,
)

from vit_model import MODEL_ARG_NAMES, VisionTransformer, create_model
from weights import (
    LoadReport,
    WeightsError,
    build_model_for,
    describe_architecture,
    fit_state_dict,
    head_is_zero,
    implied_model_args,
    load_model_for,
    read_safetensors,
    read_weights,
    resample_pos_embed,
)

# --------------------------------------------------------------------------- timm

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_file_gives_timm_logits(tmp_path, suffix):
    reference = randomize_(timm_vit(num_classes=10))
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(reference.state_dict(), path)
    else:
        torch.save(reference.state_dict(), path)

    weights = read_weights(path)

    expected = "timm safetensors" if suffix == ".safetensors" else "timm / reproduced"
    assert weights.format.startswith(expected)
    x = images()
    with torch.no_grad():
        assert_same_outputs(ours(weights, num_classes=10)(x), reference(x))


def test_format_comes_from_content_not_name(tmp_path):
    reference = random_ours()
    from safetensors.torch import save_file
    misnamed = tmp_path / "model.pth"  # a safetensors file with a .pth name
    save_file(reference.state_dict(), misnamed)
    assert read_weights(misnamed).format == "timm safetensors"
    misnamed_npz = tmp_path / "model.npz"  # a torch zip with an .npz name
    torch.save(reference.state_dict(), misnamed_npz)
    assert read_weights(misnamed_npz).format.startswith("timm / reproduced")


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "f64": torch.randn(4, generator=generator).double(),
        "i64": torch.arange(-5, 6),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(0, 9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(3, generator=generator).half(),  # leaves later data unaligned
        "after_odd": torch.randn(5, 3, generator=generator),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})

    mine, library = read_safetensors(path), load_file(path)

    assert set(mine) == set(library) == set(tensors)
    for key, value in library.items():
        assert mine[key].dtype == value.dtype, key
        assert mine[key].shape == value.shape, key
        assert torch.equal(mine[key], value), key


def test_old_in21k_layout_with_pre_logits_and_zero_head(tmp_path):
    """The jx_vit_base_patch16_224_in21k layout: timm names, pre_logits.fc, zero head."""
    source = random_ours(representation_size=64, num_classes=21)
    with torch.no_grad():
        source.head.weight.zero_()
        source.head.bias.zero_()
    path = tmp_path / "jx_vit_tiny_patch8_32_in21k.pth"
    torch.save(source.state_dict(), path)

    weights = read_weights(path)
    assert weights.format == "timm / reproduced repository .pth"
    assert head_is_zero(weights.state_dict)
    assert "pre_logits.fc.weight" in weights.state_dict
    x = images()
    with torch.no_grad():  # loads as it is into the same architecture (compare before the
        model = ours(weights, representation_size=64, num_classes=21)  # zero head)
        assert_same_outputs(model.forward_head(model.forward_features(x), pre_logits=True),
                            source.forward_head(source.forward_features(x), pre_logits=True))

    # The reproduced repository's fine-tuning model: has_logits=False, a 5-class head.
    model = VisionTransformer(**TINY, num_classes=5).eval()
    state_dict, report = fit_state_dict(model, weights.state_dict)
    assert sorted(report.left_out) == ["head.bias", "head.weight", "pre_logits.fc.bias",
                                       "pre_logits.fc.weight"]
    assert "no pre-logits layer" in report.reason and "new 5-class head" in report.reason
    model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        assert_same_outputs(model.forward_features(x), source.forward_features(x))


def test_fit_drops_a_zero_head_even_when_it_fits():
    source = random_ours(num_classes=10)
    with torch.no_grad():
        source.head.weight.zero_()
    model = VisionTransformer(**TINY, num_classes=10)
    state_dict, report = fit_state_dict(model, source.state_dict())
    assert "head.weight" not in state_dict and "all zeros" in str(report)


def test_head_is_zero():
    state_dict = random_ours().state_dict()
    assert not head_is_zero(state_dict)
    assert not head_is_zero({k: v for k, v in state_dict.items() if not k.startswith("head.")})
    state_dict["head.weight"] = torch.zeros_like(state_dict["head.weight"])
    assert head_is_zero(state_dict)  # the bias alone cannot make logits depend on the image


# --------------------------------------------------------------------------- wrappers

def _wrapped(kind: str, model: nn.Module) -> dict:
    state_dict = model.state_dict()
    if kind == "model":
        return {"model": state_dict}
    if kind == "state_dict":
        return {"state_dict": state_dict, "epoch": 3, "optimizer_name": "sgd"}
    if kind == "DataParallel":
        return nn.DataParallel(model).state_dict()
    if kind == "torch.compile":
        return torch.compile(model).state_dict()
    if kind == "DDP around torch.compile, nested":
        return {"state_dict": {f"module._orig_mod.{k}": v for k, v in state_dict.items()}}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["model", "state_dict", "DataParallel", "torch.compile",
                                  "DDP around torch.compile, nested"])
def test_wrappers_are_unwrapped(tmp_path, kind):
    source = random_ours()
    wrapped = _wrapped(kind, source)
    if kind in ("DataParallel", "torch.compile"):  # the real wrappers really prefix
        assert all(k.startswith(("module.", "_orig_mod.")) for k in wrapped)
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)

    state_dict = read_weights(path).state_dict

    assert list(state_dict) == list(source.state_dict())
    assert all(torch.equal(state_dict[k], v) for k, v in source.state_dict().items())


def test_this_projects_checkpoint(tmp_path):
    source = random_ours(num_classes=3)
    path = tmp_path / "best.pth"
    torch.save({"model": source.state_dict(), "model_args": source.model_args,
                "model_name": "vit_tiny", "class_names": ["a", "b", "c"], "epoch": 4}, path)
    weights = read_weights(path)
    assert weights.format == "this project"
    assert weights.model_args == source.model_args
    assert (weights.model_name, weights.class_names) == ("vit_tiny", ["a", "b", "c"])
    x = images()
    with torch.no_grad():
        rebuilt = VisionTransformer(**weights.model_args)
        rebuilt.load_state_dict(weights.state_dict, strict=True)
        assert_same_outputs(rebuilt.eval()(x), source(x))


# --------------------------------------------------------------------------- torchvision

def torchvision_vit(representation_size: int | None = None) -> nn.Module:
    from torchvision.models import VisionTransformer as TorchvisionViT
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                          mlp_dim=256, num_classes=10, representation_size=representation_size)


@pytest.mark.parametrize("variant", ["vit_b_16", "pre-logits", "old mlp names", "safetensors"])
def test_torchvision_gives_torchvision_logits(tmp_path, variant):
    representation_size = 48 if variant == "pre-logits" else None
    reference = randomize_(torchvision_vit(representation_size))
    state_dict = reference.state_dict()
    path = tmp_path / "vit_b_16.pth"
    if variant == "old mlp names":  # torchvision < 0.13 named them linear_1 / linear_2
        state_dict = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
                      for k, v in state_dict.items()}
        assert any(".mlp.linear_1." in k for k in state_dict)
    if variant == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "vit_b_16.safetensors"
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)

    weights = read_weights(path)

    assert weights.format.startswith("torchvision")
    x = images()
    with torch.no_grad():
        model = ours(weights, num_classes=10, representation_size=representation_size)
        assert_same_outputs(model(x), reference(x))


# --------------------------------------------------------------------------- Hugging Face

@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_hugging_face_vitmodel_pooler_is_our_pre_logits(tmp_path, layout):
    import transformers
    reference = randomize_(transformers.ViTModel(hf_config()))
    path = hf_files(reference, tmp_path, layout)

    weights = read_weights(path)

    assert weights.format.startswith("Hugging Face ViTModel")
    assert weights.model_args["layer_norm_eps"] == 1e-12
    assert weights.model_args["representation_size"] == 64
    assert weights.model_args["num_classes"] == 0
    # model_args alone rebuild the network (this is what a caller does with them).
    model = VisionTransformer(**weights.model_args)
    model.load_state_dict(weights.state_dict, strict=True)
    model.eval()
    x = images()
    with torch.no_grad():
        expected = reference(pixel_values=x)
        features = model.forward_features(x)
        assert_same_outputs(features, expected.last_hidden_state)
        assert_same_outputs(model.forward_head(features, pre_logits=True), expected.pooler_output)


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_hugging_face_classifier_gives_its_logits(tmp_path, layout):
    import transformers
    labels = ["daisy", "roses", "tulips"]
    config = hf_config(num_labels=3, id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    reference = randomize_(transformers.ViTForImageClassification(config))
    path = hf_files(reference, tmp_path, layout)

    weights = read_weights(path)

    assert weights.format.startswith("Hugging Face ViTForImageClassification")
    assert weights.class_names == labels
    x = images()
    with torch.no_grad():
        model = ours(weights, num_classes=3, layer_norm_eps=weights.model_args["layer_norm_eps"])
        assert_same_outputs(model(x), reference(pixel_values=x).logits)


def test_hugging_face_file_without_config_assumes_its_eps(tmp_path):
    import transformers
    reference = randomize_(transformers.ViTForImageClassification(hf_config(num_labels=3)))
    path = hf_files(reference, tmp_path, "model.safetensors")
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(path, lonely)
    weights = read_weights(lonely)
    assert "no config.json" in weights.format
    assert weights.model_args == {"num_classes": 3, "representation_size": None,
                                  "layer_norm_eps": 1e-12}


def test_hugging_face_config_with_another_activation_is_refused(tmp_path):
    import transformers
    reference = transformers.ViTModel(hf_config(hidden_act="gelu_new"))
    reference.save_pretrained(tmp_path / "hf")
    with pytest.raises(WeightsError, match="gelu_new"):
        read_weights(tmp_path / "hf")


# --------------------------------------------------------------------------- Google .npz

@pytest.mark.parametrize("pre_logits", [False, True], ids=["augreg", "in21k-pre-logits"])
@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_google_npz_agrees_with_timms_npz_loader(tmp_path, pre_logits, prefix):
    from timm.models.vision_transformer import _load_weights as timm_load_npz
    source = random_ours(representation_size=64 if pre_logits else None)
    arrays = {prefix + k: v for k, v in google_npz_arrays(source.state_dict(), 4).items()}
    if prefix:  # the training state beside the parameters, as in Flax checkpoints
        arrays["opt/state/step"] = np.array(1000)
    path = tmp_path / "ViT-Ti_8.npz"
    np.savez(path, **arrays)

    weights = read_weights(path)
    assert weights.format == "Google .npz"
    assert weights.model_args == {"num_heads": 4}
    model = ours(weights, num_classes=10, representation_size=64 if pre_logits else None)

    # timm's own reader of Google's files (it ignores pre-logits: compare features then).
    timm_model = timm_vit(num_classes=0 if pre_logits else 10).eval()
    with torch.no_grad():
        timm_load_npz(timm_model, str(path))
    x = images()
    with torch.no_grad():
        assert_same_outputs(model.forward_features(x), timm_model.forward_features(x))
        if not pre_logits:
            assert_same_outputs(model(x), timm_model(x))
        assert_same_outputs(model(x), source(x))


def test_npz_of_another_layout_is_refused(tmp_path):
    path = tmp_path / "big_vision.npz"
    np.savez(path, **{"params/embedding/kernel": np.zeros((8, 8, 3, 64), np.float32),
                      "params/Transformer/encoderblock/LayerNorm_0/scale": np.ones((2, 64))})
    with pytest.raises(WeightsError, match="another layout"):
        read_weights(path)


# --------------------------------------------------------------------------- resolutions

@pytest.mark.parametrize(("old_size", "new_size"), [(32, 48), (48, 32), (32, 64)])
def test_position_embedding_is_resampled_like_timm(old_size, new_size):
    from timm.layers import resample_abs_pos_embed
    source = random_ours(img_size=old_size)
    model = VisionTransformer(**{**TINY, "img_size": new_size}, num_classes=10)
    old_grid, new_grid = old_size // 8, new_size // 8

    state_dict, report = fit_state_dict(model, source.state_dict())

    pos_embed = state_dict["pos_embed"]
    assert pos_embed.shape == (1, 1 + new_grid ** 2, 64)
    assert torch.equal(pos_embed[:, 0], source.pos_embed[:, 0])  # the class position is kept
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [new_grid, new_grid],
                                      num_prefix_tokens=1)
    torch.testing.assert_close(pos_embed, expected)
    assert (f"resampled the position embedding from {old_grid}x{old_grid} to "
            f"{new_grid}x{new_grid}") in str(report)
    model.load_state_dict(state_dict, strict=True)


def test_resample_keeps_a_smooth_grid_smooth():
    # A linear ramp across the grid stays monotonic after upsampling.
    ramp = torch.linspace(0, 1, 4).repeat(4, 1).reshape(1, 16, 1)
    pos_embed = torch.cat([torch.full((1, 1, 1), 7.0), ramp], dim=1)
    out = resample_pos_embed(pos_embed, 8)
    assert out.shape == (1, 65, 1) and out[0, 0, 0] == 7.0
    rows = out[0, 1:, 0].reshape(8, 8)
    assert torch.all(rows[:, 1:] >= rows[:, :-1] - 1e-6)
    assert torch.allclose(rows, rows[:1].expand(8, 8))


def test_fit_reports_resampling(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(random_ours().state_dict(), path)
    model = VisionTransformer(**{**TINY, "img_size": 48}, num_classes=10)
    state_dict, report = fit_state_dict(model, read_weights(path).state_dict)
    model.load_state_dict(state_dict, strict=False)
    assert isinstance(report, LoadReport)
    assert "from 4x4 to 6x6" in str(report)
    assert model.pos_embed.shape == (1, 37, 64)


def test_other_patch_size_is_an_error_that_says_so():
    source = random_ours()  # patch 8
    model = VisionTransformer(**{**TINY, "patch_size": 16}, num_classes=10)
    with pytest.raises(WeightsError, match="patch size 8 in the file, 16 in the model"):
        fit_state_dict(model, source.state_dict())


def test_base32_into_base16_names_both():
    file_state = create_model("vit_base_patch32_224").state_dict()
    model = create_model("vit_base_patch16_224", num_classes=5)
    with pytest.raises(WeightsError) as error:
        fit_state_dict(model, file_state)
    message = str(error.value)
    assert "patch size 32 in the file, 16 in the model" in message
    assert "ViT-B/32 (12 blocks, width 768) at 224 px, 1000 classes" in message
    assert "ViT-B/16 (12 blocks, width 768) at 224 px, 5 classes" in message


def test_wider_model_names_the_first_mismatching_keys_and_shapes():
    wide = random_ours(embed_dim=96)  # an "L into B"
    model = VisionTransformer(**TINY, num_classes=10)
    with pytest.raises(WeightsError) as error:
        fit_state_dict(model, wide.state_dict())
    message = str(error.value)
    assert "cls_token is (1, 1, 96) in the file but (1, 1, 64) in the model" in message
    assert "pos_embed is (1, 17, 96) in the file but (1, 17, 64) in the model" in message
    assert "width 96" in message and "width 64" in message


@pytest.mark.parametrize(("depth", "expected"), [
    (3, "unexpected blocks.2.norm1.weight, blocks.2.norm1.bias, blocks.2.attn.qkv.weight"),
    (1, "missing blocks.1.norm1.weight, blocks.1.norm1.bias, blocks.1.attn.qkv.weight"),
])
def test_other_depth_names_the_keys(depth, expected):
    other = random_ours(depth=depth)
    model = VisionTransformer(**TINY, num_classes=10)
    with pytest.raises(WeightsError, match=expected.replace(".", r"\.")):
        fit_state_dict(model, other.state_dict())


def test_describe_architecture():
    state_dict = create_model("vit_tiny_patch16_224", num_classes=21843,
                              has_logits=True).state_dict()
    assert describe_architecture(state_dict) == (
        "ViT-Ti/16 (12 blocks, width 192) at 224 px, 21843 classes, pre-logits")
    assert describe_architecture({"foo": torch.zeros(1)}).startswith("not a ViT")


# --------------------------------------------------------------------------- safety

@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, zip_format):
    control_marker, marker = tmp_path / "control-ran", tmp_path / "pwned"
    control, path = tmp_path / "control.pth", tmp_path / "evil.pth"
    state_dict = random_ours().state_dict()
    for file, flag in ((control, control_marker), (path, marker)):
        torch.save({"model": state_dict, "extra": SideEffect(flag)}, file,
                   _use_new_zipfile_serialization=zip_format)
    # The fixture really is dangerous: unpickling it unguarded creates the file.
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    with pytest.raises(WeightsError, match="refusing to load") as error:
        read_weights(path)

    assert not marker.exists()
    assert "open" in str(error.value) and str(path) in str(error.value)


def test_an_npz_with_pickled_objects_is_refused_unrun(tmp_path):
    control_marker, marker = tmp_path / "control-ran", tmp_path / "pwned"
    control, path = tmp_path / "control.npz", tmp_path / "evil.npz"
    for file, flag in ((control, control_marker), (path, marker)):
        evil = np.empty(1, dtype=object)
        evil[0] = SideEffect(flag)
        np.savez(file, **{"embedding/kernel": np.zeros((8, 8, 3, 64), np.float32)}, evil=evil)
    with np.load(control, allow_pickle=True) as npz:  # unguarded, it runs
        npz["evil"]
    assert control_marker.exists()

    with pytest.raises(WeightsError, match="refusing to load"):
        read_weights(path)

    assert not marker.exists()


def _valid_file(path):
    state_dict = random_ours().state_dict()
    if path.suffix == ".npz":
        np.savez(path, **google_npz_arrays(state_dict, 4))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    read_weights(path)  # the intact file reads


@pytest.mark.parametrize("damage", ["empty", "truncated", "header only", "random bytes"])
@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_damaged_files_raise_weights_error(tmp_path, suffix, damage):
    path = tmp_path / f"weights{suffix}"
    _valid_file(path)
    data = path.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header only":
        data = data[:100]
    else:
        data = random.Random(suffix).randbytes(len(data))
    path.write_bytes(data)

    with pytest.raises(WeightsError) as error:
        read_weights(path)

    assert str(path) in str(error.value)


def test_legacy_pickle_truncated(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(random_ours().state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_weights(path)


@pytest.mark.parametrize("content", [{"a": 1, "b": "text"}, [torch.zeros(1)],
                                     {"foo.weight": torch.zeros(2)}])
def test_not_a_vit_state_dict(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=str(path)):
        read_weights(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(tmp_path / "nope.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match="not a weights file"):
        read_weights(text)
    with pytest.raises(WeightsError, match="without model.safetensors"):
        read_weights(tmp_path)


# --------------------------------------------------------------------------- the model for a file

def assert_same_model(model: VisionTransformer, source: VisionTransformer) -> None:
    assert model.model_args == source.model_args
    x = images(size=source.model_args["img_size"])
    with torch.no_grad():
        assert_same_outputs(model(x), source(x))


def test_model_args_are_every_constructor_argument_but_the_speed_switch():
    """complete_args relies on MODEL_ARG_NAMES naming all that shapes or trains the model."""
    import inspect
    assert set(MODEL_ARG_NAMES) == set(inspect.signature(VisionTransformer).parameters) - {
        "fused_attn"}
    arguments = {**TINY, "num_classes": 3, "mlp_ratio": 2.0, "qkv_bias": False,
                 "representation_size": 16, "drop_rate": 0.1, "attn_drop_rate": 0.2,
                 "drop_path_rate": 0.3, "layer_norm_eps": 1e-5, "in_chans": 1}
    model = VisionTransformer(**arguments, fused_attn=False)
    assert model.model_args == arguments and tuple(model.model_args) == MODEL_ARG_NAMES


def test_this_projects_checkpoint_rebuilds_from_its_model_args(tmp_path):
    source = random_ours(num_classes=3, img_size=48, layer_norm_eps=1e-5)
    path = tmp_path / "best.pth"
    torch.save({"model": source.state_dict(), "model_args": source.model_args,
                "model_name": "vit_tiny", "class_names": ["a", "b", "c"]}, path)
    weights = read_weights(path)

    assert weights.complete_args
    implied = implied_model_args(weights)
    assert implied == {**TINY, "img_size": 48, "num_classes": 3, "representation_size": None,
                       "layer_norm_eps": 1e-5}
    assert implied.items() <= weights.model_args.items()
    # The stored arguments as they are: the model name cannot change them.
    assert_same_model(load_model_for(weights, "vit_base_patch16_224_in21k"), source)


def test_timm_state_dict_implies_its_shapes_only(tmp_path):
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file
    save_file(randomize_(timm_vit(num_classes=7)).state_dict(), path)
    weights = read_weights(path)

    assert not weights.complete_args
    implied = implied_model_args(weights)
    assert implied == {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                       "num_classes": 7, "representation_size": None}


def test_pre_logits_and_another_resolution_are_implied(tmp_path):
    source = randomize_(create_model("vit_demo_patch8_64", img_size=56, num_classes=5,
                                     has_logits=True))
    path = tmp_path / "demo56.pth"
    torch.save(source.state_dict(), path)
    weights = read_weights(path)

    implied = implied_model_args(weights)
    assert (implied["img_size"], implied["representation_size"], implied["num_classes"]) == (
        56, 128, 5)
    assert_same_model(load_model_for(weights, "vit_demo_patch8_64"), source)


def test_a_file_of_another_architecture_names_the_model_that_fits(tmp_path):
    """A demo file at 56 px and the default ViT-B/16: not '56 is not a multiple of 16'."""
    path = tmp_path / "demo56.pth"
    torch.save(create_model("vit_demo_patch8_64", img_size=56, num_classes=5).state_dict(), path)
    weights = read_weights(path)

    with pytest.raises(WeightsError) as error:
        load_model_for(weights, "vit_base_patch16_224_in21k")
    message = str(error.value)
    assert "vit_base_patch16_224_in21k (patch size 16, width 768, 12 blocks" in message
    assert "7x7 grid of 8 px patches" in message
    assert message.endswith("pass --model-name vit_demo_patch8_64.")
    assert "multiple" not in message and "\n" not in message

    # A grid the named model can be built for: the shapes differ, the advice is the same.
    torch.save(create_model("vit_demo_patch8_64", num_classes=5).state_dict(), path)
    with pytest.raises(WeightsError, match="pass --model-name vit_demo_patch8_64.$"):
        load_model_for(read_weights(path), "vit_small_patch16_224")


def test_hugging_face_states_its_eps_and_heads(tmp_path):
    import transformers
    reference = randomize_(transformers.ViTForImageClassification(hf_config(num_labels=3)))
    weights = read_weights(hf_files(reference, tmp_path, "folder"))

    implied = implied_model_args(weights)
    assert (implied["layer_norm_eps"], implied["num_heads"]) == (1e-12, 4)
    assert not weights.complete_args  # config.json does not say drop rates and the like
    model = build_model_for(weights, "vit_tiny_patch16_224",
                            fine_tune={"num_classes": 5, "has_logits": False})
    # Fine-tuning keeps the named model's shapes and takes what the file states.
    assert model.model_args["layer_norm_eps"] == 1e-12 and model.model_args["num_heads"] == 4
    assert model.model_args["embed_dim"] == 192 and model.model_args["num_classes"] == 5


def test_google_npz_states_its_heads(tmp_path):
    path = tmp_path / "ViT-Ti_8.npz"
    np.savez(path, **google_npz_arrays(random_ours().state_dict(), 4))
    assert implied_model_args(read_weights(path))["num_heads"] == 4


TAMPERED_MODEL_ARGS = {
    "a list": (lambda args: list(args.items()), "model_args is a list, not a dict"),
    "text": (lambda args: "depth=2", "model_args is a str, not a dict"),
    "a foreign key": (lambda args: {**args, "evil": 1}, "names evil, which are not arguments"),
    "a broken value": (lambda args: {**args, "depth": "two"}, "model_args do not build a model"),
}


@pytest.mark.parametrize("tamper", TAMPERED_MODEL_ARGS)
def test_a_checkpoint_with_tampered_model_args_is_refused(tmp_path, tamper):
    change, message = TAMPERED_MODEL_ARGS[tamper]
    source = random_ours()
    path = tmp_path / "best.pth"
    torch.save({"model": source.state_dict(), "model_args": change(source.model_args)}, path)
    with pytest.raises(WeightsError, match=message):
        load_model_for(read_weights(path), "vit_tiny_patch16_224")


# --------------------------------------------------------------------------- every safetensors
# dtype torch has, read by our reader and by the library

SAFETENSORS_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                      torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                      *(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2")
                        if hasattr(torch, name))]


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES, ids=str)
def test_safetensors_reader_matches_the_library_for_every_dtype(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    values = torch.linspace(-3, 3, 24).reshape(4, 6)
    if dtype == torch.bool:
        tensor = values > 0
    elif dtype.is_floating_point:
        tensor = values.to(dtype)
    else:
        tensor = (values * 10).round().clamp(0 if dtype == torch.uint8 else -100, 100).to(dtype)
    path = tmp_path / "one.safetensors"
    save_file({"odd": torch.ones(3, dtype=torch.uint8), "t": tensor}, path)  # "t" unaligned
    mine, library = read_safetensors(path), load_file(path)
    assert mine["t"].dtype == library["t"].dtype == dtype
    assert mine["t"].shape == (4, 6)
    assert torch.equal(mine["t"].view(torch.uint8), library["t"].view(torch.uint8))
    assert torch.equal(mine["odd"], library["odd"])


# ------------------------------------------------------------ hand-written safetensors headers

SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1}


def write_safetensors(path, entries: dict, data: bytes) -> None:
    """The format by hand: header length (u64 little-endian), JSON header, data."""
    import json

    header = json.dumps(entries).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("dtype, size", SAFETENSORS_SIZES.items())
def test_safetensors_offsets_that_disagree_with_shape_and_dtype(tmp_path, dtype, size):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"t": {"dtype": dtype, "shape": [2, 3],
                                   "data_offsets": [0, 6 * size]}}, bytes(6 * size))
    assert tuple(read_safetensors(good)["t"].shape) == (2, 3)
    for span in (6 * size - 1, 6 * size + 1, 6 * (size * 2 if size < 8 else size // 2)):
        bad = tmp_path / f"bad{span}.safetensors"
        write_safetensors(bad, {"t": {"dtype": dtype, "shape": [2, 3],
                                      "data_offsets": [0, span]}}, bytes(64))
        with pytest.raises(WeightsError, match=f"tensor t is {dtype} \\[2, 3\\], {6 * size} "
                                               f"bytes, but its offsets span {span}"):
            read_weights(bad)


@pytest.mark.parametrize("shape, offsets", [
    ([-1, -4], [0, 16]),         # a product that is positive
    ([0, -5], [0, 0]),           # a product of zero
    ([10 ** 12, 10 ** 12], [0, 4 * 10 ** 24]),  # absurd, and offsets that agree
    ([2.5, 2], [0, 20]),
    ([True, 4], [0, 16]),
    ("4", [0, 16]),
    ([4], [16, 0]),
    ([4], [0]),
])
def test_safetensors_header_with_impossible_shape_or_offsets(tmp_path, shape, offsets):
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
                      bytes(64))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weights(path)


def test_a_torchscript_export_is_named_as_one(tmp_path):
    # export.py's file is a zip too, which torch.load refuses: say what it is, not "corrupt".
    path = tmp_path / "vit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and torch.jit's deprecation notices
        torch.jit.save(torch.jit.trace(random_ours().eval(), images()), str(path))
    with pytest.raises(WeightsError) as error:
        read_weights(path)
    assert str(error.value) == (
        f"{path} is a TorchScript export of a model, which the commands do not read as "
        f"weights; pass the checkpoint (.pth) it was exported from.")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("name, advice", [
    ("best.pth", "pass one of the run's model-*.pth in {run} instead, or rebuild it by running "
                 "the run's train.py command again with --resume auto --output-dir {run}."),
    ("model-3.pth", "pass another of the run's checkpoints in {run} instead (best.pth or "
                    "another model-*.pth)."),
    ("interrupted.pth", "pass another of the run's checkpoints in {run} instead (best.pth or "
                        "another model-*.pth)."),
    ("jx_vit_base_patch16_224_in21k-e5005f0a.pth", "download it again."),
    ("model-final.pth", "download it again."),  # no epoch checkpoint's name: not the run's
])
def test_a_damaged_file_says_what_to_do_instead(tmp_path, name, advice, damage):
    # A checkpoint a training run wrote cannot be downloaded again; the run's others can
    # stand in for it.
    run = tmp_path / "run"
    run.mkdir()
    path = run / name
    _valid_file(path)
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:1000])
    with pytest.raises(WeightsError) as error:
        read_weights(path)
    message = str(error.value)
    assert message.startswith(f"Weights file {path} is empty; " if damage == "empty" else
                              f"{path} is not a readable ")
    assert message.endswith(advice.format(run=run)), message
