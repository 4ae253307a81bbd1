"""train.py and predict.py end to end, in-process, on small synthetic flowers (CPU, seconds)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
import train
from demo_data import CLASSES
from my_dataset import build_transforms, open_rgb
from vit_model import VisionTransformer, create_model

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "learning_rate")
CLASS_LINE = re.compile(r"^class: (\S+)\s+prob: (\d\.\d{4})$", re.M)


def run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """Call a script's main(argv) in-process; return its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def train_args(data: Path, output_dir: Path, log_dir: Path, *extra) -> list:
    return ["--data-path", data, "--model-name", "vit_demo_patch8_64", "--weights", "",
            "--workers", "0", "--device", "cpu", "--batch-size", "8",
            "--output-dir", output_dir, "--log-dir", log_dir, *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_user_error(code: int, err: str) -> str:
    """Exit status 2 and exactly one line on stderr, 'error: ...', with no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# --------------------------------------------------------------------------- one two-epoch run

@dataclass
class Run:
    root: Path  # the working directory of the run
    data: Path
    output_dir: Path
    log_dir: Path
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_flowers) -> Run:
    """Two epochs from scratch, run from a fresh working directory with relative paths."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code, out, err = run_cli(train.main, train_args(
            demo_flowers, Path("weights"), Path("runs"),
            "--epochs", "2", "--lr", "0.01", "--no-freeze-layers"))
    return Run(root, demo_flowers, root / "weights", root / "runs", code, out, err)


def test_training_writes_checkpoints_and_class_indices(run):
    assert run.code == 0, run.err
    names = {p.name for p in run.output_dir.iterdir()}
    assert {"best.pth", "class_indices.json", "model-0.pth", "model-1.pth"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # no half-written files left behind
    indices = json.loads((run.output_dir / "class_indices.json").read_text())
    assert indices == {str(i): name for i, name in enumerate(CLASSES)}
    # Everything went where it was asked to: no class_indices.json in the working directory.
    assert sorted(os.listdir(run.root)) == ["runs", "weights"]


def test_training_prints_the_reproduced_lines(run):
    assert "60 images were found in the dataset." in run.out
    assert "50 images for training." in run.out
    assert "10 images for validation." in run.out
    assert "Using 0 dataloader workers every process" in run.out
    assert re.search(r"\[train epoch 0\] loss: \d+\.\d{3}, acc: \d\.\d{3}", run.out)
    assert re.search(r"\[train epoch 1\] loss: \d+\.\d{3}, acc: \d\.\d{3}", run.out)
    assert re.search(r"\[valid epoch 1\] loss: \d+\.\d{3}, acc: \d\.\d{3}", run.out)
    assert "Traceback" not in run.err


def test_checkpoints_carry_what_is_needed_to_use_them(run):
    for epoch in (0, 1):
        checkpoint = load(run.output_dir / f"model-{epoch}.pth")
        for key in ("model", "model_name", "model_args", "class_names", "epoch", "metrics"):
            assert key in checkpoint, key
        assert checkpoint["epoch"] == epoch
        assert checkpoint["model_name"] == "vit_demo_patch8_64"
        assert checkpoint["class_names"] == list(CLASSES)
        assert set(SCALARS) <= set(checkpoint["metrics"])
        model = VisionTransformer(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"], strict=True)
        assert model.num_classes == 5 and model.image_size == 64
    first, second = load(run.output_dir / "model-0.pth"), load(run.output_dir / "model-1.pth")
    assert not torch.equal(first["model"]["head.weight"], second["model"]["head.weight"])
    assert not torch.equal(first["model"]["blocks.0.attn.qkv.weight"],
                           second["model"]["blocks.0.attn.qkv.weight"])  # not frozen


def test_best_checkpoint_is_the_epoch_with_the_best_val_acc(run):
    accs = [load(run.output_dir / f"model-{e}.pth")["metrics"]["val_acc"] for e in (0, 1)]
    best = load(run.output_dir / "best.pth")
    assert best["epoch"] in (0, 1)
    assert accs[best["epoch"]] == max(accs)  # on a tie either epoch is the best
    assert best["metrics"]["val_acc"] == max(accs)
    same = load(run.output_dir / f"model-{best['epoch']}.pth")["model"]
    for key, value in best["model"].items():
        assert torch.equal(value, same[key]), key


def test_tensorboard_logs_every_scalar_for_each_epoch(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in run.log_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1
    assert list(runs[0].glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    for epoch in (0, 1):
        metrics = load(run.output_dir / f"model-{epoch}.pth")["metrics"]
        for tag in SCALARS:
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [0, 1], tag
            assert scalars[epoch].value == pytest.approx(metrics[tag], rel=1e-5, abs=1e-7), tag
    # The report's cosine schedule: lr, then lr * ((1 + cos(pi / 2)) / 2 * 0.99 + 0.01).
    lrs = [s.value for s in events.Scalars("learning_rate")]
    assert lrs == pytest.approx([0.01, 0.01 * 0.505], rel=1e-5)
    for tag in ("train_acc", "val_acc"):
        assert all(0.0 <= s.value <= 1.0 for s in events.Scalars(tag))


# --------------------------------------------------------------------------- predict

def parse_classes(out: str) -> list[tuple[str, float]]:
    return [(name, float(prob)) for name, prob in CLASS_LINE.findall(out)]


def test_predict_prints_every_class_and_the_prediction(run):
    image = run.data / "tulips" / "tulips_0000.jpg"
    code, out, err = run_cli(predict.main, [image, "--weights", run.output_dir / "best.pth",
                                            "--device", "cpu"])
    assert code == 0, err
    rows = parse_classes(out)
    assert [name for name, _ in rows] == list(CLASSES)
    assert sum(prob for _, prob in rows) == pytest.approx(1.0, abs=1e-3)
    predicted = re.search(r"^predicted: (\S+)", out, re.M)
    assert predicted and predicted.group(1) == max(rows, key=lambda r: r[1])[0]

    # The same numbers as the checkpoint's model applied by hand.
    checkpoint = load(run.output_dir / "best.pth")
    model = VisionTransformer(**checkpoint["model_args"]).eval()
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        x = build_transforms(64, train=False)(open_rgb(image)).unsqueeze(0)
        expected = model(x).softmax(-1)[0].tolist()
    assert [p for _, p in rows] == pytest.approx(expected, abs=1e-4)


def test_predict_saves_a_figure(run, tmp_path):
    image = run.data / "daisy" / "daisy_0001.jpg"
    figure = tmp_path / "figures" / "prediction.png"
    code, _, err = run_cli(predict.main, [image, "--weights", run.output_dir / "model-1.pth",
                                          "--device", "cpu", "--save-fig", figure])
    assert code == 0, err
    with Image.open(figure) as img:
        assert img.format == "PNG"
        assert img.width > 50 and img.height > 50


def test_predict_finds_best_pth_in_weights_by_default(run, monkeypatch):
    image = run.data / "roses" / "roses_0002.jpg"
    _, explicit, _ = run_cli(predict.main, [image, "--weights", run.output_dir / "best.pth",
                                            "--device", "cpu"])
    monkeypatch.chdir(run.root)
    code, out, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert code == 0, err
    assert parse_classes(out) == parse_classes(explicit)
    assert len(parse_classes(out)) == 5


# --------------------------------------------------------------------------- fine-tuning

def test_fine_tune_with_frozen_backbone_trains_only_the_head(demo_flowers, tmp_path):
    # A "pretrained" file in the in21k layout: pre-logits and a head of another size.
    torch.manual_seed(0)
    pretrained = create_model("vit_demo_patch8_64", num_classes=10, representation_size=128)
    with torch.no_grad():
        pretrained.head.weight.normal_()
    weights_file = tmp_path / "pretrained.pth"
    torch.save(pretrained.state_dict(), weights_file)
    source = pretrained.state_dict()

    out_dir = tmp_path / "weights"
    argv = train_args(demo_flowers, out_dir, tmp_path / "runs", "--epochs", "1",
                      "--lr", "0.05", "--freeze-layers")
    argv[argv.index("--weights") + 1] = weights_file
    code, out, err = run_cli(train.main, argv)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("Weights "))
    assert str(weights_file) in line and "left out" in line and "pre_logits" in line

    trained = load(out_dir / "model-0.pth")["model"]
    assert not any(k.startswith("pre_logits.") for k in trained)
    backbone = [k for k in trained if not k.startswith("head.")]
    assert len(backbone) == len(source) - 4
    for key in backbone:
        assert torch.equal(trained[key], source[key]), key
    assert trained["head.weight"].shape == (5, 128)
    assert trained["head.weight"].abs().sum() > 0  # moved away from its zero start
    assert trained["head.bias"].abs().sum() > 0


# --------------------------------------------------------------------------- flags

@pytest.mark.parametrize(("argv", "expected"), [
    ([], True),
    (["--freeze-layers"], True),
    (["--freeze-layers", "false"], False),
    (["--freeze-layers", "False"], False),
    (["--freeze-layers", "0"], False),
    (["--freeze-layers", "no"], False),
    (["--freeze-layers", "true"], True),
    (["--freeze-layers", "True"], True),
    (["--freeze-layers", "1"], True),
    (["--freeze-layers", "yes"], True),
    (["--freeze-layers=false"], False),
    (["--no-freeze-layers"], False),
])
def test_freeze_layers_flag_spellings(argv, expected):
    assert train.get_args_parser().parse_args(argv).freeze_layers is expected


def test_freeze_layers_rejects_nonsense(capsys):
    with pytest.raises(SystemExit) as info:
        train.get_args_parser().parse_args(["--freeze-layers", "maybe"])
    assert info.value.code == 2
    assert "maybe" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num_classes", "--num-classes"])
def test_num_classes_both_spellings(flag):
    assert train.get_args_parser().parse_args([flag, "5"]).num_classes == 5


# --------------------------------------------------------------------------- user errors

def test_error_missing_data_path(tmp_path):
    code, _, err = run_cli(train.main, train_args(tmp_path / "nowhere", tmp_path / "out",
                                                  tmp_path / "runs"))
    line = assert_user_error(code, err)
    assert "nowhere" in line
    assert_nothing_written(tmp_path / "out")


def test_error_no_class_folders(tmp_path, jpeg_bytes):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(jpeg_bytes)
    code, _, err = run_cli(train.main, train_args(flat, tmp_path / "out", tmp_path / "runs"))
    line = assert_user_error(code, err)
    assert "class folders" in line
    assert_nothing_written(tmp_path / "out")


def test_error_class_folders_without_images(tmp_path):
    data = tmp_path / "data"
    (data / "daisy").mkdir(parents=True)
    (data / "roses").mkdir()
    (data / "roses" / "README.txt").write_text("nothing here")
    code, _, err = run_cli(train.main, train_args(data, tmp_path / "out", tmp_path / "runs"))
    line = assert_user_error(code, err)
    assert "images" in line
    assert_nothing_written(tmp_path / "out")


def test_error_missing_weights_file(demo_flowers, tmp_path):
    argv = train_args(demo_flowers, tmp_path / "out", tmp_path / "runs")
    argv[argv.index("--weights") + 1] = tmp_path / "vit_base_patch16_224_in21k.pth"
    code, _, err = run_cli(train.main, argv)
    line = assert_user_error(code, err)
    assert "vit_base_patch16_224_in21k.pth" in line
    assert "download.py" in line and "--weights ''" in line
    assert_nothing_written(tmp_path / "out")


def test_error_weights_of_another_architecture(demo_flowers, tmp_path):
    narrow = create_model("vit_demo_patch8_64", embed_dim=64, num_heads=4, num_classes=5)
    weights_file = tmp_path / "narrow.pth"
    torch.save(narrow.state_dict(), weights_file)
    argv = train_args(demo_flowers, tmp_path / "out", tmp_path / "runs", "--no-freeze-layers")
    argv[argv.index("--weights") + 1] = weights_file
    code, _, err = run_cli(train.main, argv)
    line = assert_user_error(code, err)
    assert any(key in line for key in narrow.state_dict()), line
    assert_nothing_written(tmp_path / "out")


def test_error_num_classes_disagrees_with_the_folders(demo_flowers, tmp_path):
    code, _, err = run_cli(train.main, train_args(demo_flowers, tmp_path / "out",
                                                  tmp_path / "runs", "--num-classes", "3"))
    line = assert_user_error(code, err)
    assert "3" in line and "5" in line
    assert_nothing_written(tmp_path / "out")


def test_predict_errors(run, tmp_path, monkeypatch):
    best = run.output_dir / "best.pth"
    code, _, err = run_cli(predict.main, [tmp_path / "missing.jpg", "--weights", best,
                                          "--device", "cpu"])
    assert "missing.jpg" in assert_user_error(code, err)

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, _, err = run_cli(predict.main, [text, "--weights", best, "--device", "cpu"])
    assert "notes.txt" in assert_user_error(code, err)

    fake = tmp_path / "fake.jpg"
    fake.write_text("not a JPEG either")
    code, _, err = run_cli(predict.main, [fake, "--weights", best, "--device", "cpu"])
    assert "fake.jpg" in assert_user_error(code, err)

    image = run.data / "daisy" / "daisy_0000.jpg"
    code, _, err = run_cli(predict.main, [image, "--weights", tmp_path / "nothing.pth",
                                          "--device", "cpu"])
    assert "nothing.pth" in assert_user_error(code, err)

    monkeypatch.chdir(tmp_path)  # no ./weights here
    code, _, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert "weights" in assert_user_error(code, err)


# --------------------------------------------------------------------------- NaN

def test_nan_loss_stops_with_status_1_and_keeps_earlier_checkpoints(demo_flowers, tmp_path):
    # Epoch 0 trains at lr 0.01; --lrf 1e30 makes epoch 1's lr about 5e27, which blows up.
    out_dir = tmp_path / "out"
    code, _, err = run_cli(train.main, train_args(
        demo_flowers, out_dir, tmp_path / "runs", "--epochs", "2", "--lr", "0.01",
        "--lrf", "1e30", "--no-freeze-layers"))
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert re.search(r"epoch 1, step \d+", lines[0]), lines[0]
    assert "Traceback" not in err

    assert not (out_dir / "model-1.pth").exists()
    for name in ("model-0.pth", "best.pth"):
        checkpoint = load(out_dir / name)
        assert checkpoint["epoch"] == 0
        assert math.isfinite(checkpoint["metrics"]["train_loss"])
        for key, value in checkpoint["model"].items():
            assert torch.isfinite(value).all(), (name, key)


def test_nan_loss_in_the_first_epoch(demo_flowers, tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(train.main, train_args(
        demo_flowers, out_dir, tmp_path / "runs", "--epochs", "1", "--lr", "1e30",
        "--no-freeze-layers"))
    assert code == 1, err
    assert re.search(r"^error: .*epoch 0, step \d+", err, re.M), err
    assert not list(out_dir.glob("*.pth"))


# --------------------------------------------------------------------------- --demo

def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(train.main, ["--demo", "--epochs", "1", "--workers", "0"])
    assert code == 0, err
    data = tmp_path / "demo_data" / "flower_photos"
    assert sorted(p.name for p in data.iterdir()) == sorted(CLASSES)
    assert all(any(p.glob("*.jpg")) for p in data.iterdir())
    assert (tmp_path / "weights" / "best.pth").is_file()
    assert (tmp_path / "weights" / "model-0.pth").is_file()
    assert not (tmp_path / "weights" / "model-1.pth").exists()  # --epochs 1 was honoured
    checkpoint = load(tmp_path / "weights" / "best.pth")
    assert checkpoint["model_name"] == "vit_demo_patch8_64"
    assert checkpoint["class_names"] == list(CLASSES)

    image = next((data / "sunflowers").glob("*.jpg"))
    code, out, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert code == 0, err
    assert len(parse_classes(out)) == 5
    assert re.search(r"^predicted: \S+", out, re.M)


def test_demo_honours_flags_given_explicitly_even_at_their_default(tmp_path):
    argv = ["--demo", "--data-path", str(tmp_path / "mine"), "--batch-size", "8",
            "--freeze-layers"]
    args = train.get_args_parser().parse_args(argv)
    train.apply_demo_settings(args, train.given_options(argv))
    assert args.data_path == str(tmp_path / "mine")
    assert args.batch_size == 8
    assert args.freeze_layers is True
    assert args.model_name == "vit_demo_patch8_64"  # not given: the demo's


def test_demo_keeps_the_data_path_it_is_given(tmp_path):
    argv = ["--demo", "--data-path", str(tmp_path / "mine"), "--lr", "0.2"]
    args = train.get_args_parser().parse_args(argv)
    train.apply_demo_settings(args, train.given_options(argv))
    assert args.data_path == str(tmp_path / "mine")
    assert not (tmp_path / "mine").exists()  # no demo images written over a user's path
    assert args.lr == 0.2
    assert args.model_name == "vit_demo_patch8_64" and args.weights == ""


def test_copying_a_checkpoint_elsewhere_keeps_it_usable(run, tmp_path):
    # A checkpoint names its classes itself: no class_indices.json needs to travel with it.
    lone = tmp_path / "lone" / "model.pth"
    lone.parent.mkdir()
    shutil.copy(run.output_dir / "model-0.pth", lone)
    image = run.data / "dandelion" / "dandelion_0003.jpg"
    code, out, err = run_cli(predict.main, [image, "--weights", lone, "--device", "cpu"])
    assert code == 0, err
    assert [name for name, _ in parse_classes(out)] == list(CLASSES)
