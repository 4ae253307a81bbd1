"""predict, convert, evaluate and export build the same model for the same weights file
(weights.build_model_for), a bare state dict or a Hugging Face folder alike."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from weight_files import randomize_

import convert
import evaluate
import export
import predict
from utils import write_class_indices
from vit_model import create_model
from weights import read_weights

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
DEMO = "vit_demo_patch8_64"


def demo_state_dict_at_56(folder: Path) -> Path:
    """The demo ViT trained at --img-size 56, saved as a bare state dict with its classes."""
    path = folder / "demo56.pth"
    torch.save(randomize_(create_model(DEMO, img_size=56, num_classes=5)).state_dict(), path)
    write_class_indices(CLASSES, folder / "class_indices.json")
    return path


def hugging_face_folder(folder: Path) -> Path:
    """A transformers ViTForImageClassification of the demo's sizes at 56 px, as saved."""
    import transformers
    config = transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        image_size=56, patch_size=8, num_labels=5, id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)}, attn_implementation="eager")
    randomize_(transformers.ViTForImageClassification(config)).save_pretrained(folder / "hf")
    return folder / "hf"


@pytest.fixture(params=["state dict at 56 px", "Hugging Face folder"])
def weights_file(request, tmp_path: Path) -> Path:
    folder = tmp_path / "file"
    folder.mkdir()
    if request.param == "state dict at 56 px":
        return demo_state_dict_at_56(folder)
    return hugging_face_folder(folder)


def test_every_command_builds_the_same_model(weights_file, demo_flowers, tmp_path):
    model, class_names = predict.load_classifier(weights_file, model_name=DEMO)
    assert class_names == CLASSES and model.model_args["img_size"] == 56

    converted = tmp_path / "converted.pth"
    rc, _, err = run_cli(convert.main, [weights_file, converted, "--model-name", DEMO])
    assert rc == 0, err
    assert read_weights(converted).model_args == model.model_args

    exported = tmp_path / "vit.pt"
    rc, _, err = run_cli(export.main, ["--weights", weights_file, "--model-name", DEMO,
                                       "--output", exported])
    assert rc == 0, err
    extra = {"config.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.load(str(exported), _extra_files=extra)
    config = json.loads(extra["config.json"])
    assert (config["img_size"], config["class_names"]) == (56, CLASSES)
    batch = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(batch), model(batch), rtol=1e-5, atol=1e-5)

    # predict and evaluate give the same numbers from the file as from its conversion.
    image = demo_flowers / "roses" / "roses_0000.jpg"
    predictions, metrics = [], []
    for i, weights in enumerate((weights_file, converted)):
        rc, out, err = run_cli(predict.main, [image, "--weights", weights, "--model-name", DEMO,
                                              "--device", "cpu", "--json"])
        assert rc == 0, err
        predictions.append(json.loads(out))
        out_dir = tmp_path / f"evaluation{i}"
        rc, _, err = run_cli(evaluate.main, ["--weights", weights, "--model-name", DEMO,
                                             "--data-path", demo_flowers, "--all", "--device",
                                             "cpu", "--workers", "0", "--output-dir", out_dir])
        assert rc == 0, err
        report = json.loads((out_dir / "metrics.json").read_text())
        metrics.append({k: v for k, v in report.items() if k != "weights"})
    assert predictions[0] == predictions[1]  # the same model on the same image
    assert metrics[0] == metrics[1] and metrics[0]["num_images"] == 60


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_a_file_for_another_model_is_one_line_naming_the_model_that_fits(
        command, demo_flowers, tmp_path):
    """A state dict trained at --img-size 56, used with the default --model-name (ViT-B/16)."""
    weights = demo_state_dict_at_56(tmp_path)
    args = {"predict": (predict.main, [demo_flowers / "roses" / "roses_0000.jpg"]),
            "evaluate": (evaluate.main, ["--data-path", demo_flowers,
                                         "--output-dir", tmp_path / "out"]),
            "export": (export.main, ["--output", tmp_path / "out" / "vit.pt"])}
    main, extra = args[command]
    device = [] if command == "export" else ["--device", "cpu"]
    rc, _, err = run_cli(main, [*extra, "--weights", weights, *device])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "7x7 grid of 8 px patches" in err and f"pass --model-name {DEMO}" in err
    assert not (tmp_path / "out").exists()


def test_an_export_passed_as_weights_is_named_as_one(tmp_path, demo_flowers):
    # export.py's own output, given back to predict as --weights: one line saying what it is.
    weights = demo_state_dict_at_56(tmp_path)
    exported = tmp_path / "vit.pt"
    rc, _, err = run_cli(export.main, ["--weights", weights, "--model-name", DEMO, "--output",
                                       exported])
    assert rc == 0, err
    rc, out, err = run_cli(predict.main, [demo_flowers / "roses" / "roses_0000.jpg", "--weights",
                                          exported, "--device", "cpu"])
    assert rc == 2 and out == "" and err == (
        f"error: {exported} is a TorchScript export of a model, which the commands do not read "
        f"as weights; pass the checkpoint (.pth) it was exported from.\n")
