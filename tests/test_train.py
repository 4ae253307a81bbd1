"""train.py: its flags, what a run writes and prints, end to end, and its user errors.

Resuming, interruptions, --keep and non-finite losses are in test_train_resume.py; bad flags,
failed writes and resuming a damaged or changed run in test_train_faults.py. A few resume
details that need no run of their own (the grad scaler's state) stay here.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load, one_error_line, random_loader, run_cli, tiny_model, train_argv
from torch.utils.data import DataLoader, TensorDataset

import download
import predict
import train
from checkpoints import make_checkpoint, training_state
from demo_data import CLASSES
from device_data import DeviceEvalLoader, DeviceTrainLoader
from distributed import Distributed
from my_dataset import open_rgb
from utils import Split, StepSettings, evaluate, read_split_data, train_one_epoch
from vit_model import VisionTransformer, create_model

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "learning_rate")
CLASS_LINE = re.compile(r"^class: (\S+)\s+prob: (\d\.\d{4})$", re.M)


def parse_classes(out: str) -> list[tuple[str, float]]:
    return [(name, float(prob)) for name, prob in CLASS_LINE.findall(out)]


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# ------------------------------------------------- the session's two-epoch run (trained_demo)

def test_training_writes_checkpoints_and_class_indices(trained_demo):
    names = {p.name for p in trained_demo.output_dir.iterdir()}
    assert {"best.pth", "class_indices.json", "model-0.pth", "model-1.pth"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # no half-written files left behind
    indices = json.loads((trained_demo.output_dir / "class_indices.json").read_text())
    assert indices == {str(i): name for i, name in enumerate(CLASSES)}
    # Everything went where it was asked to: no class_indices.json in the working directory.
    assert sorted(os.listdir(trained_demo.root)) == ["runs", "weights"]


def test_training_prints_the_reproduced_lines(trained_demo):
    assert "60 images were found in the dataset." in trained_demo.out
    assert "45 images for training." in trained_demo.out
    assert "15 images for validation." in trained_demo.out
    assert "Using 0 dataloader workers every process" in trained_demo.out
    assert re.search(r"\[train epoch 0\] loss: \d+\.\d{3}, acc: \d\.\d{3}", trained_demo.out)
    assert re.search(r"\[train epoch 1\] loss: \d+\.\d{3}, acc: \d\.\d{3}", trained_demo.out)
    assert re.search(r"\[valid epoch 1\] loss: \d+\.\d{3}, acc: \d\.\d{3}", trained_demo.out)
    assert "Traceback" not in trained_demo.err


def test_checkpoints_carry_what_is_needed_to_use_them(trained_demo):
    for epoch in (0, 1):
        checkpoint = load(trained_demo.output_dir / f"model-{epoch}.pth")
        for key in ("model", "model_name", "model_args", "class_names", "epoch", "metrics"):
            assert key in checkpoint, key
        assert checkpoint["epoch"] == epoch
        assert checkpoint["model_name"] == "vit_demo_patch8_64"
        assert checkpoint["class_names"] == list(CLASSES)
        assert set(SCALARS) <= set(checkpoint["metrics"])
        model = VisionTransformer(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"], strict=True)
        assert model.num_classes == 5 and model.image_size == 64
    first = load(trained_demo.output_dir / "model-0.pth")
    second = load(trained_demo.output_dir / "model-1.pth")
    assert not torch.equal(first["model"]["head.weight"], second["model"]["head.weight"])
    assert not torch.equal(first["model"]["blocks.0.attn.qkv.weight"],
                           second["model"]["blocks.0.attn.qkv.weight"])  # not frozen


def test_best_checkpoint_is_the_epoch_with_the_best_val_acc(trained_demo):
    accs = [load(trained_demo.output_dir / f"model-{e}.pth")["metrics"]["val_acc"]
            for e in (0, 1)]
    best = load(trained_demo.output_dir / "best.pth")
    assert best["epoch"] in (0, 1)
    assert accs[best["epoch"]] == max(accs)  # on a tie either epoch is the best
    assert best["metrics"]["val_acc"] == max(accs)
    same = load(trained_demo.output_dir / f"model-{best['epoch']}.pth")["model"]
    for key, value in best["model"].items():
        assert torch.equal(value, same[key]), key


def test_tensorboard_logs_every_scalar_for_each_epoch(trained_demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in trained_demo.log_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1
    assert list(runs[0].glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    for epoch in (0, 1):
        metrics = load(trained_demo.output_dir / f"model-{epoch}.pth")["metrics"]
        for tag in SCALARS:
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [0, 1], tag
            assert scalars[epoch].value == pytest.approx(metrics[tag], rel=1e-5, abs=1e-7), tag
    # The report's cosine schedule: lr, then lr * ((1 + cos(pi / 2)) / 2 * 0.99 + 0.01).
    lrs = [s.value for s in events.Scalars("learning_rate")]
    assert lrs == pytest.approx([0.01, 0.01 * 0.505], rel=1e-5)
    for tag in ("train_acc", "val_acc"):
        assert all(0.0 <= s.value <= 1.0 for s in events.Scalars(tag))


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
    argv = train_argv(demo_flowers, tmp_path, lr=0.05, freeze_layers=True, weights=weights_file)
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
    code, _, err = run_cli(train.main, train_argv(tmp_path / "nowhere", tmp_path))
    line = one_error_line(code, err)
    assert "nowhere" in line
    assert_nothing_written(tmp_path / "weights")


def test_error_no_class_folders(tmp_path, jpeg_bytes):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(jpeg_bytes)
    code, _, err = run_cli(train.main, train_argv(flat, tmp_path))
    line = one_error_line(code, err)
    assert "class folders" in line
    assert_nothing_written(tmp_path / "weights")


def test_error_class_folders_without_images(tmp_path):
    data = tmp_path / "data"
    (data / "daisy").mkdir(parents=True)
    (data / "roses").mkdir()
    (data / "roses" / "README.txt").write_text("nothing here")
    code, _, err = run_cli(train.main, train_argv(data, tmp_path))
    line = one_error_line(code, err)
    assert "images" in line
    assert_nothing_written(tmp_path / "weights")


def test_error_missing_weights_file(demo_flowers, tmp_path):
    argv = train_argv(demo_flowers, tmp_path,
                      weights=tmp_path / "vit_base_patch16_224_in21k.pth")
    code, _, err = run_cli(train.main, argv)
    line = one_error_line(code, err)
    assert "vit_base_patch16_224_in21k.pth" in line
    assert "download.py" in line and "--weights ''" in line
    assert_nothing_written(tmp_path / "weights")


def test_error_weights_of_another_architecture(demo_flowers, tmp_path):
    narrow = create_model("vit_demo_patch8_64", embed_dim=64, num_heads=4, num_classes=5)
    weights_file = tmp_path / "narrow.pth"
    torch.save(narrow.state_dict(), weights_file)
    argv = train_argv(demo_flowers, tmp_path, weights=weights_file)
    code, _, err = run_cli(train.main, argv)
    line = one_error_line(code, err)
    assert any(key in line for key in narrow.state_dict()), line
    assert_nothing_written(tmp_path / "weights")


def test_error_num_classes_disagrees_with_the_folders(demo_flowers, tmp_path):
    code, _, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, num_classes=3))
    line = one_error_line(code, err)
    assert "3" in line and "5" in line
    assert_nothing_written(tmp_path / "weights")


# --------------------------------------------------------------------------- --demo, end to end

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


# ------------------------------------ --download, --device-data, --cache-val-features, --compile

def flowers_archive(demo_flowers: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(demo_flowers, arcname="flower_photos")
    return buffer.getvalue()


def test_download_fetches_missing_data_and_weights_then_trains(
        demo_flowers, server, tmp_path, monkeypatch):
    weights_file = tmp_path / "pretrained.pth"
    torch.save(create_model("vit_demo_patch8_64", num_classes=10).state_dict(), weights_file)
    data = weights_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:8]
    monkeypatch.setattr(download, "FLOWERS_URL",
                        server.publish("flower_photos.tgz", flowers_archive(demo_flowers)))
    monkeypatch.setattr(download, "FLOWER_CLASS_COUNTS", dict.fromkeys(CLASSES, 12))
    monkeypatch.setitem(download.WEIGHTS, "pth", download.WEIGHTS["pth"]._replace(
        url=server.publish(f"pretrained-{digest}.pth", data)))

    target = tmp_path / "work"
    code = train.main(train_argv(target / "flower_photos", target, download=True,
                                 weights=target / "vit.pth", freeze_layers=True))
    assert code == 0
    assert len(list((target / "flower_photos" / "roses").glob("*.jpg"))) == 12
    assert (target / "vit.pth").read_bytes() == data
    assert (target / "weights" / "best.pth").is_file()


def test_download_refuses_a_data_path_it_cannot_fetch(tmp_path, capsys):
    code = train.main(["--download", "--data-path", str(tmp_path / "my_images"),
                       "--weights", "", "--device", "cpu"])
    assert code == 2
    assert "--download fetches flower_photos" in capsys.readouterr().err


def test_device_data_trains_on_the_cpu(demo_flowers, tmp_path, capsys):
    code = train.main(train_argv(demo_flowers, tmp_path, device_data=True, epochs=2))
    assert code == 0
    assert "Images decoded once and kept on cpu." in capsys.readouterr().out
    checkpoint = load(tmp_path / "weights" / "model-1.pth")
    assert checkpoint["samples"] == {"train": 50, "val": 10}
    # Each epoch's validation confusion matrix is a TensorBoard image.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs").iterdir())),
                              size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("confusion_matrix")] == [0, 1]


def test_frozen_backbone_cached_validation_matches_full_validation(demo_flowers, tmp_path,
                                                                   monkeypatch):
    pretrained = tmp_path / "pretrained.pth"
    torch.save(create_model("vit_demo_patch8_64", num_classes=5).state_dict(), pretrained)
    from_cache = []  # per validation through the cache: were the features already kept?

    class WatchedCache(train.FeatureCache):
        def evaluate(self, *args, **kwargs):
            from_cache.append(self.batches is not None)
            return super().evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "FeatureCache", WatchedCache)
    results, used = {}, {}
    for flag in ("--cache-val-features", "--no-cache-val-features"):
        out = tmp_path / flag
        from_cache.clear()
        assert train.main(train_argv(demo_flowers, out, flag, weights=pretrained,
                                     freeze_layers=True, epochs=2, lr=0.1)) == 0
        used[flag] = list(from_cache)
        results[flag] = [load(out / "weights" / f"model-{e}.pth")["metrics"] for e in (0, 1)]
    for cached, full in zip(results["--cache-val-features"], results["--no-cache-val-features"],
                            strict=True):
        assert cached["val_acc"] == full["val_acc"]
        assert cached["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
        assert cached["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    # The frozen backbone's features are computed in epoch 0 and served in epoch 1.
    assert used == {"--cache-val-features": [False, True], "--no-cache-val-features": []}


def test_compile_saves_the_plain_module(demo_flowers, tmp_path, monkeypatch):
    # Inductor's C++ code generation takes one to two minutes on two cold CPU cores. The
    # wrapper whose "_orig_mod." prefix must not reach the checkpoint is the same for every
    # backend, and aot_eager still traces the model's forward and backward graphs.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    # Batches of 10 split the 50 training and 10 validation images evenly: one shape each,
    # so nothing is compiled again for a short last batch.
    assert train.main(train_argv(demo_flowers, tmp_path, compile=True, batch_size=10)) == 0
    state = load(tmp_path / "weights" / "best.pth")["model"]
    assert not any(key.startswith("_orig_mod.") for key in state)
    model = create_model("vit_demo_patch8_64", num_classes=5)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------- recipe options and torchrun

@pytest.mark.parametrize("extra", [
    ["--opt", "adamw", "--lr", "0.001", "--wd", "0.05", "--warmup-epochs", "1"],
    ["--clip-grad", "1", "--label-smoothing", "0.1", "--accum-steps", "3", "--drop-path", "0.1"],
    ["--no-augment"],
])
def test_recipe_options_train(demo_flowers, tmp_path, extra):
    assert train.main(train_argv(demo_flowers, tmp_path, *extra, epochs=2)) == 0
    last = load(tmp_path / "weights" / "model-1.pth")
    assert all(math.isfinite(v) for v in last["metrics"].values())
    assert last["args"]["accum_steps"] == (3 if "--accum-steps" in extra else 1)


def test_amp_run_trains_and_saves_float32_weights(tmp_path):
    # bfloat16 matmuls are about ten times slower than float32 on CPUs without native
    # bfloat16, so this run gets a folder of its own: one training step of 5 images and
    # one validation batch of 5.
    from demo_data import make_demo_flowers

    data = make_demo_flowers(tmp_path / "flower_photos", per_class=2)
    assert train.main(train_argv(data, tmp_path, "--amp", batch_size=5, val_rate=0.5)) == 0
    checkpoint = load(tmp_path / "weights" / "model-0.pth")
    assert checkpoint["args"]["amp"] is True
    assert checkpoint["samples"] == {"train": 5, "val": 5}
    assert all(math.isfinite(v) for v in checkpoint["metrics"].values())
    # Autocast computes in bfloat16; the parameters it updates stay float32.
    assert {value.dtype for value in checkpoint["model"].values()} == {torch.float32}


def test_torchrun_two_processes_match_one_process_of_their_combined_batch(demo_flowers,
                                                                          tmp_path):
    # Two ranks of 8 average their gradients over the same 16 images a single process of 16
    # sees in one batch (the shards interleave one order), with the same random crops: each
    # image's are drawn from a seed of its own, not from the rank's generator.
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(train_argv(demo_flowers, single, batch_size=16)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *train_argv(demo_flowers, double, batch_size=8)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("images were found in the dataset.") == 1  # rank 0 only
    one, two = load(single / "weights" / "model-0.pth"), load(double / "weights" / "model-0.pth")
    assert two["samples"] == one["samples"] == {"train": 50, "val": 10}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "learning_rate"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    assert sorted(p.name for p in (double / "weights").iterdir()) == [
        "best.pth", "class_indices.json", "model-0.pth"]
    assert len(list((double / "runs").rglob("events.out.tfevents.*"))) == 1

# --------------------------------------------------------------------------- each recipe option
# takes effect: the optimizer, the step, the schedule, the model and the data it builds

def parsed(*argv: object) -> argparse.Namespace:
    return train.get_args_parser().parse_args([str(a) for a in argv])


def quiet_cpu_setup() -> train.Setup:
    return train.Setup(torch.device("cpu"), Distributed(), lambda *a, **k: None)


def random_batches(batches: int = 3, batch_size: int = 4) -> DataLoader:
    """Full batches of images with a large spread (standard deviation 3): big gradients."""
    return random_loader(batches * batch_size, batch_size, scale=3.0)


def grad_norm(params) -> float:
    return torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


def one_update(opt_flags: list[str], grads: list[list[float]]) -> torch.Tensor:
    """The change of a parameter [1, -2, 3] after one step per gradient in grads."""
    start = torch.tensor([1.0, -2.0, 3.0])
    param = torch.nn.Parameter(start.clone())
    optimizer = train.build_optimizer(parsed(*opt_flags), [param], torch.device("cpu"))
    for grad in grads:
        param.grad = torch.tensor(grad)
        optimizer.step()
    return param.detach() - start


def test_opt_adamw_builds_adamw_whose_update_differs_from_sgds():
    flags = ["--lr", "0.1", "--wd", "0"]
    assert type(train.build_optimizer(parsed("--opt", "adamw"), [torch.nn.Parameter(
        torch.zeros(1))], torch.device("cpu"))) is torch.optim.AdamW
    assert type(train.build_optimizer(parsed(), [torch.nn.Parameter(torch.zeros(1))],
                                      torch.device("cpu"))) is torch.optim.SGD
    grad = [0.5, 0.1, -4.0]
    # SGD's first step is -lr * g; Adam's is -lr * g / |g| (its moments are g and g**2).
    torch.testing.assert_close(one_update(flags, [grad]), torch.tensor([-0.05, -0.01, 0.4]))
    torch.testing.assert_close(one_update(["--opt", "adamw", *flags], [grad]),
                               torch.tensor([-0.1, -0.1, 0.1]), atol=1e-5, rtol=0)


def test_momentum_and_weight_decay_reach_sgd():
    # Momentum 0.5, two steps with the same g: -lr * g, then -lr * (0.5 * g + g).
    change = one_update(["--lr", "0.1", "--wd", "0", "--momentum", "0.5"], [[1.0, 2.0, -2.0]] * 2)
    torch.testing.assert_close(change, torch.tensor([-0.25, -0.5, 0.5]))
    # Weight decay 0.5 with a zero gradient: the step is -lr * wd * w.
    change = one_update(["--lr", "0.1", "--wd", "0.5", "--momentum", "0"], [[0.0, 0.0, 0.0]])
    torch.testing.assert_close(change, torch.tensor([-0.05, 0.1, -0.15]))


def test_recipe_flags_reach_the_training_step():
    args = parsed("--clip-grad", "1.5", "--label-smoothing", "0.1", "--accum-steps", "3",
                  "--amp", "--opt", "adamw", "--no-freeze-layers", "--weights", "")
    optimisation = train.build_optimisation(args, tiny_model(), quiet_cpu_setup(), False)
    assert optimisation.settings == StepSettings(torch.bfloat16, None, 3, 1.5, 0.1)
    assert type(optimisation.optimizer) is torch.optim.AdamW
    defaults = train.build_optimisation(parsed("--no-freeze-layers"), tiny_model(),
                                        quiet_cpu_setup(), False)
    assert defaults.settings == StepSettings(None, None, 1, None, 0.0)


def test_clip_grad_caps_the_global_norm_of_every_applied_step():
    applied = {}
    for clip in (None, 0.05):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        norms = applied[clip] = []
        optimizer.register_step_pre_hook(
            lambda opt, *_, norms=norms: norms.append(grad_norm(opt.param_groups[0]["params"])))
        train_one_epoch(model, optimizer, random_batches(), torch.device("cpu"), 0,
                        StepSettings(clip_grad=clip))
    assert len(applied[0.05]) == 3
    assert min(applied[None]) > 0.05  # without clipping every step is above the limit
    assert applied[0.05] == pytest.approx([0.05] * 3, rel=1e-4)


def test_warmup_starts_at_lr_over_warmup_plus_one_then_follows_the_cosine():
    # --lr 0.3 --epochs 5 --warmup-epochs 2 --lrf 0.01, by hand: 0.3 / 3, 0.3 * 2 / 3, then
    # the cosine over the 3 epochs left: 0.3 * ((1 + cos(pi * t / 3)) / 2 * 0.99 + 0.01).
    expected = [0.1, 0.2, 0.3, 0.3 * (0.75 * 0.99 + 0.01), 0.3 * (0.25 * 0.99 + 0.01)]
    optimisation = train.build_optimisation(
        parsed("--lr", "0.3", "--epochs", "5", "--warmup-epochs", "2", "--no-freeze-layers"),
        tiny_model(), quiet_cpu_setup(), False)
    lrs = []
    for _ in range(5):
        lrs.append(optimisation.optimizer.param_groups[0]["lr"])
        optimisation.optimizer.step()
        optimisation.scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_label_smoothing_gives_the_hand_computed_loss_on_a_known_batch():
    # A linear "model" whose logits are its inputs: z = [2, 0, -1] and [0, 1, 0], labels 0, 2.
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    logits = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    batch = DataLoader(TensorDataset(torch.tensor(logits), torch.tensor([0, 2])), batch_size=2)

    def smoothed(z: list[float], label: int, eps: float) -> float:
        log_sum = math.log(sum(math.exp(v) for v in z))
        nll = [log_sum - v for v in z]  # -log softmax
        return (1 - eps) * nll[label] + eps * sum(nll) / len(z)

    for eps in (0.0, 0.1):
        expected = (smoothed(logits[0], 0, eps) + smoothed(logits[1], 2, eps)) / 2
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = train_one_epoch(model, optimizer, batch, torch.device("cpu"), 0,
                                StepSettings(label_smoothing=eps))
        assert stats.loss == pytest.approx(expected, rel=1e-6)


def test_drop_path_makes_training_forwards_stochastic_and_evaluation_deterministic():
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for rate, stochastic in ((0.5, True), (0.0, False)):
        model = train.build_model(parsed("--model-name", "vit_demo_patch8_64", "--weights", "",
                                         "--drop-path", rate), num_classes=5, log=lambda _: None)
        with torch.no_grad():
            model.head.weight.normal_()  # a zero head would hide every difference
            model.train()
            differ = not torch.equal(model(images), model(images))
            model.eval()
            assert torch.equal(model(images), model(images))
        assert differ is stochastic, rate


@pytest.fixture(scope="module")
def demo_split(demo_flowers) -> Split:
    return read_split_data(demo_flowers)


def train_and_val_loaders(split: Split, *flags: object) -> tuple:
    return train.build_dataloaders(split, parsed("--batch-size", "4", *flags), 64, 0,
                                   torch.device("cpu"), Distributed(), lambda _: None)


def test_no_augment_trains_on_the_evaluation_transform(demo_split):
    plain, val_loader = train_and_val_loaders(demo_split, "--no-augment")
    augmented, _ = train_and_val_loaders(demo_split)
    evaluation = val_loader.dataset.transform
    image = open_rgb(demo_split.train_images[0])
    torch.manual_seed(0)
    assert torch.equal(plain.dataset[0][0], evaluation(image))
    assert torch.equal(plain.dataset[0][0], plain.dataset[0][0])
    # The training set takes (index, seed) keys: the crop is random, and the seed's.
    draws = [augmented.dataset[(0, seed)][0] for seed in (1, 2, 3)]
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # random crops: they differ
    assert torch.equal(augmented.dataset[(0, 1)][0], draws[0])


def test_val_batch_size_sets_the_validation_batch_and_defaults_to_twice_the_training_batch(
        demo_split):
    train_loader, val_loader = train_and_val_loaders(demo_split, "--val-batch-size", "7")
    assert (train_loader.batch_size, val_loader.batch_size) == (4, 7)
    assert train_and_val_loaders(demo_split)[1].batch_size == 8


def test_amp_on_the_cpu_autocasts_to_bfloat16_inside_the_model():
    assert train.amp_settings(parsed("--amp"), torch.device("cpu")) == (torch.bfloat16, None)
    assert train.amp_settings(parsed(), torch.device("cpu")) == (None, None)
    for amp_dtype, expected in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        model = tiny_model()
        seen = []
        model.blocks[0].attn.qkv.register_forward_hook(
            lambda module, inputs, output, seen=seen: seen.append(output.dtype))
        train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), random_batches(1),
                        torch.device("cpu"), 0, StepSettings(amp_dtype=amp_dtype))
        assert seen == [expected]


def test_float16_with_a_grad_scaler_scales_the_backward_and_steps_unscaled_gradients():
    backward, applied, weights = {}, {}, {}
    for name, scaler in (("scaled", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)),
                         ("unscaled", None)):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        backward[name], applied[name] = [], []
        model.blocks[0].attn.qkv.weight.register_hook(
            lambda grad, seen=backward[name]: seen.append(grad.norm().item()))
        optimizer.register_step_pre_hook(
            lambda opt, *_, seen=applied[name]: seen.append(grad_norm(
                opt.param_groups[0]["params"])))
        train_one_epoch(model, optimizer, random_batches(1), torch.device("cpu"), 0,
                        StepSettings(amp_dtype=torch.float16, scaler=scaler))
        weights[name] = model.blocks[0].attn.qkv.weight.detach()
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** 12  # finite gradients: the scale stays
    assert backward["scaled"][0] == pytest.approx(2 ** 12 * backward["unscaled"][0], rel=1e-2)
    assert applied["scaled"][0] == pytest.approx(applied["unscaled"][0], rel=1e-2)
    torch.testing.assert_close(weights["scaled"], weights["unscaled"], rtol=1e-3, atol=1e-4)


def test_resume_restores_the_grad_scalers_state():
    model = tiny_model()
    args = parsed("--no-freeze-layers", "--epochs", "3")
    saved = train.build_optimisation(args, model, quiet_cpu_setup(), False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(()))  # a scaler's state begins with its first scale()
    scaler.update(new_scale=512.0)  # as after a few overflows
    checkpoint = make_checkpoint(model, "m", ["a", "b", "c"], vars(args), 0, {},
                                 **training_state(saved.optimizer, saved.scheduler, scaler))
    resumed = train.build_optimisation(args, model, quiet_cpu_setup(), True)
    resumed.settings.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    progress = train.start_or_resume(args, checkpoint, resumed)
    assert progress.start_epoch == 1
    assert resumed.settings.scaler.get_scale() == 512.0


def test_tf32_is_accepted_on_the_cpu_and_changes_nothing_there():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for flag in ("--tf32", "--no-tf32"):
        assert parsed(flag).tf32 is (flag == "--tf32")
        train.set_up(parsed(flag, "--device", "cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# --------------------------------------------------------------------------- promises of train.py
# that no other test reaches

def test_two_runs_started_in_the_same_second_get_their_own_log_folders(demo_flowers, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(train.time, "strftime", lambda *_: "20250101-120000")  # a frozen clock
    for out in ("a", "b"):
        assert train.main(train_argv(demo_flowers, tmp_path / out, log_dir=tmp_path / "runs",
                                     batch_size=30)) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["20250101-120000", "20250101-120000-"]
    log_dirs = {load(tmp_path / out / "weights" / "model-0.pth")["log_dir"] for out in "ab"}
    assert log_dirs == {str(tmp_path / "runs" / name) for name in folders}
    for name in folders:
        assert len(list((tmp_path / "runs" / name).glob("events.out.tfevents.*"))) == 1


def test_img_size_with_pretrained_weights_resamples_the_position_embedding_and_fine_tunes(
        demo_flowers, tmp_path):
    torch.manual_seed(0)
    pretrained = create_model("vit_demo_patch8_64", num_classes=10)  # an 8 x 8 position grid
    weights_file = tmp_path / "pretrained.pth"
    torch.save(pretrained.state_dict(), weights_file)
    code, out, err = run_cli(train.main, train_argv(demo_flowers, tmp_path, weights=weights_file,
                                                    img_size=48, freeze_layers=True))
    assert code == 0, err
    assert "resampl" in next(line for line in out.splitlines() if line.startswith("Weights "))
    checkpoint = load(tmp_path / "weights" / "model-0.pth")
    assert checkpoint["model_args"]["img_size"] == 48
    pos_embed = checkpoint["model"]["pos_embed"]
    assert pos_embed.shape == (1, 1 + 6 * 6, pretrained.embed_dim)
    # The class token's position is kept; the grid is the pretrained one, resampled to 6 x 6.
    torch.testing.assert_close(pos_embed[:, :1], pretrained.pos_embed[:, :1].detach())
    grid = pretrained.pos_embed[:, 1:].detach().reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                                align_corners=False, antialias=True)  # timm's
    torch.testing.assert_close(pos_embed[:, 1:], resampled.permute(0, 2, 3, 1).reshape(1, 36, -1),
                               rtol=1e-4, atol=1e-5)
    assert checkpoint["model"]["head.weight"].abs().sum() > 0  # and it fine-tuned


def test_validation_of_a_backbone_that_trains_is_never_served_from_cached_features(
        trained_demo):
    # The session's run trains every layer (--no-freeze-layers, --cache-val-features at its
    # default): epoch 1's validation must be that of epoch 1's weights, not epoch 0's features.
    checkpoint = load(trained_demo.output_dir / "model-1.pth")
    model = VisionTransformer(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    split = read_split_data(trained_demo.data, trained_demo.val_rate, trained_demo.seed)
    _, val_loader = train_and_val_loaders(split)
    stats = evaluate(model, val_loader, torch.device("cpu"), 1)
    assert checkpoint["metrics"]["val_loss"] == pytest.approx(stats.loss, rel=1e-5)
    assert checkpoint["metrics"]["val_acc"] == stats.acc


@pytest.mark.parametrize(("flags", "device_data"), [
    ([], False),                                   # the CPU's default: the DataLoader
    (["--device-data"], True),                     # asked for by name: on the CPU too
    (["--device-data", "--no-augment"], False),    # no device-side eval-only training set
    (["--no-device-data"], False),
])
def test_when_train_py_decodes_the_images_once_on_the_device(demo_split, flags, device_data):
    train_loader, val_loader = train_and_val_loaders(demo_split, *flags)
    assert isinstance(train_loader, DeviceTrainLoader) is device_data
    assert isinstance(val_loader, DeviceEvalLoader) is device_data
    assert isinstance(train_loader, DataLoader) is not device_data


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # asked for
def test_loader_workers_are_capped_at_one_per_training_batch(demo_flowers):
    # --workers 100000 used to start that many processes and run the machine out of memory.
    args = train.get_args_parser().parse_args(["--data-path", str(demo_flowers), "--workers",
                                               "100000", "--batch-size", "8", "--device", "cpu"])
    split = read_split_data(demo_flowers)  # 50 training images: 7 batches of 8
    notes = []
    setup = train.Setup(torch.device("cpu"), Distributed(world_size=1), notes.append)
    model = create_model("vit_demo_patch8_64", num_classes=5)
    train_loader, _ = train.build_loaders(args, split, model, setup)
    assert train_loader.num_workers == 7
    assert "Using 7 dataloader workers every process" in notes
