"""convert.py in-process on real files: its output loads with strict=True and computes the same."""

from __future__ import annotations

import numpy as np
import torch
from weight_files import (
    TINY,
    assert_same_outputs,
    google_npz_arrays,
    images,
    random_ours,
    randomize_,
)

import convert
from vit_model import VisionTransformer
from weights import read_weights


def test_npz_to_plain_state_dict(tmp_path, capsys):
    source = random_ours(representation_size=64)
    src, dst = tmp_path / "ViT-Ti_8.npz", tmp_path / "out" / "converted.pth"
    np.savez(src, **{f"opt/target/{k}": v
                     for k, v in google_npz_arrays(source.state_dict(), 4).items()})

    assert convert.main([str(src), str(dst)]) == 0

    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "Google .npz" in out[0] and str(dst) in out[0]
    state_dict = torch.load(dst, weights_only=True)
    assert sorted(state_dict) == sorted(source.state_dict())
    model = VisionTransformer(**TINY, num_classes=10, representation_size=64)
    model.load_state_dict(state_dict, strict=True)
    x = images()
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), source(x))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted.pth"]  # no temp file left


def test_hugging_face_with_model_name_writes_a_checkpoint_that_rebuilds_itself(tmp_path, capsys):
    import transformers
    # ViT-Ti/16 at 32 px, 5 classes: vit_tiny_patch16_224's sizes, a small input.
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=16,
                                    num_labels=5, attn_implementation="eager")
    reference = randomize_(transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "hf")
    dst = tmp_path / "vit_tiny_flowers.pth"

    assert convert.main([str(tmp_path / "hf"), str(dst),
                         "--model-name", "vit_tiny_patch16_224"]) == 0

    assert "strict=True" in capsys.readouterr().out
    weights = read_weights(dst)
    assert weights.format == "this project" and weights.model_name == "vit_tiny_patch16_224"
    assert weights.model_args["layer_norm_eps"] == 1e-12
    assert (weights.model_args["img_size"], weights.model_args["num_classes"]) == (32, 5)
    model = VisionTransformer(**weights.model_args)
    model.load_state_dict(weights.state_dict, strict=True)
    x = images()
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), reference(pixel_values=x).logits)


def test_plain_output_of_hugging_face_notes_the_eps(tmp_path, capsys):
    import transformers
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=256, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "hf")
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "out.pth")]) == 0
    assert "layer_norm_eps=1e-12" in capsys.readouterr().err


def test_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    src = tmp_path / "tiny.pth"
    torch.save(random_ours().state_dict(), src)
    dst = tmp_path / "out.pth"

    assert convert.main([str(tmp_path / "missing.pth"), str(dst)]) == 2
    assert capsys.readouterr().err.startswith("error: ")

    # ViT-S/16 is wider and has another patch size than the file.
    assert convert.main([str(src), str(dst), "--model-name", "vit_small_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The weights do not fit the model")
    assert "cls_token is (1, 1, 64) in the file but (1, 1, 384) in the model" in err

    assert convert.main([str(src), str(dst), "--model-name", "no_such_model"]) == 2
    assert "Unknown model 'no_such_model'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]


def test_a_destination_where_no_file_can_be_written(tmp_path, capsys):
    src = tmp_path / "src.pth"
    torch.save(random_ours().state_dict(), src)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    for dst in (tmp_path / "folder", tmp_path / "file" / "out.pth"):
        assert convert.main([str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not any((tmp_path / "folder").iterdir())
    assert (tmp_path / "file").read_text() == "keep me"
