"""evaluate.py on a tiny trained checkpoint: its files exist and their numbers agree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import train
from demo_data import make_demo_flowers
from visualize import confusion_matrix, per_class_metrics, plot_confusion_matrix

OUTPUTS = ("metrics.json", "metrics.csv", "misclassified.csv", "confusion_matrix.png",
           "class_distribution.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, checkpoint) trained with a non-default seed and validation rate, so
    evaluate.py must read them from the checkpoint to rebuild the same split."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_demo_flowers(root / "flower_photos", per_class=8)
    rc = train.main(["--data-path", str(data), "--model-name", "vit_demo_patch8_64",
                     "--weights", "", "--no-freeze-layers", "--epochs", "1", "--batch-size", "8",
                     "--lr", "0.05", "--device", "cpu", "--workers", "0", "--seed", "3",
                     "--val-rate", "0.25", "--output-dir", str(root / "weights"),
                     "--log-dir", str(root / "runs")])
    assert rc == 0
    return data, root / "weights" / "best.pth"


def run_evaluate(args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_outputs_exist_and_agree(trained, tmp_path, capsys):
    data, ckpt = trained
    out_dir = tmp_path / "eval"
    rc, out, _ = run_evaluate(["--weights", ckpt, "--data-path", data, "--output-dir", out_dir,
                               "--device", "cpu", "--workers", "0", "--batch-size", "4"], capsys)
    assert rc == 0
    for name in OUTPUTS:
        assert (out_dir / name).is_file(), name
    for name in ("confusion_matrix.png", "class_distribution.png"):
        with Image.open(out_dir / name) as picture:
            assert picture.format == "PNG"

    metrics = json.loads((out_dir / "metrics.json").read_text())
    cm = torch.tensor(metrics["confusion_matrix"])
    total, correct = int(cm.sum()), int(cm.diag().sum())
    assert total == metrics["num_images"] == 10  # int(8 * 0.25) = 2 per class for validation
    assert metrics["subset"] == "validation" and metrics["seed"] == 3
    assert metrics["accuracy"] == pytest.approx(correct / total)
    printed = [line for line in out.splitlines() if line.startswith("accuracy: ")]
    assert printed == [f"accuracy: {correct / total:.4f} ({correct} of {total} images)"]

    # The same split and model as train.py's validation: the same accuracy.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert metrics["accuracy"] == pytest.approx(checkpoint["metrics"]["val_acc"])

    with (out_dir / "misclassified.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == total - correct
    for row in rows:
        assert row["true"] != row["predicted"]
        assert Path(row["path"]).parent.name == row["true"]
        assert 0 < float(row["prob"]) <= 1
    for name in metrics["class_names"]:  # each row's mistakes counted off the diagonal
        i = metrics["class_names"].index(name)
        assert sum(r["true"] == name for r in rows) == int(cm[i].sum() - cm[i, i])

    with (out_dir / "metrics.csv").open() as f:
        table = {row["class"]: row for row in csv.DictReader(f)}
    for i, name in enumerate(metrics["class_names"]):
        assert int(table[name]["support"]) == int(cm[i].sum())
        recall = cm[i, i].item() / cm[i].sum().item()
        assert float(table[name]["recall"]) == pytest.approx(recall, abs=1e-6)
        assert metrics["classes"][name]["recall"] == pytest.approx(recall)


def test_all_evaluates_every_image(trained, tmp_path, capsys):
    data, ckpt = trained
    rc, _, _ = run_evaluate(["--weights", ckpt, "--data-path", data, "--output-dir", tmp_path,
                             "--device", "cpu", "--workers", "0", "--all"], capsys)
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["subset"] == "all" and metrics["num_images"] == 40
    assert [c["support"] for c in metrics["classes"].values()] == [8] * 5


def test_data_folder_with_other_classes_exits_2(trained, tmp_path, capsys):
    _, ckpt = trained
    other = make_demo_flowers(tmp_path / "flowers", per_class=2)
    (other / "tulips").rename(other / "orchids")
    rc, out, err = run_evaluate(["--weights", ckpt, "--data-path", other, "--device", "cpu",
                                 "--output-dir", tmp_path / "eval"], capsys)
    assert rc == 2 and err.startswith("error: ") and "orchids" in err
    assert not (tmp_path / "eval").exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    rc, _, err = run_evaluate(["--weights", tmp_path / "none.pth", "--device", "cpu"], capsys)
    assert rc == 2 and err == f"error: Weights file {tmp_path / 'none.pth'} does not exist.\n"


def test_confusion_matrix_and_metrics_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(preds, labels, 4)  # class 3 never occurs
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    m = per_class_metrics(cm)
    torch.testing.assert_close(m["precision"], torch.tensor([1.0, 0.5, 0.5, 0.0],
                                                            dtype=torch.float64))
    torch.testing.assert_close(m["recall"], torch.tensor([2 / 3, 0.5, 1.0, 0.0],
                                                         dtype=torch.float64))
    torch.testing.assert_close(m["f1"], torch.tensor([0.8, 0.5, 2 / 3, 0.0], dtype=torch.float64))
    assert m["support"].tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)


def test_confusion_matrix_figure_is_a_figure():
    from matplotlib.figure import Figure

    fig = plot_confusion_matrix(torch.tensor([[3, 1], [0, 2]]), ["a", "b"])
    assert isinstance(fig, Figure)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0", "1", "2", "3"]


@pytest.mark.parametrize("kind", ["corrupt", "malicious"])
def test_bad_weights_are_blamed_before_the_missing_data_folder(kind, tmp_path, monkeypatch,
                                                               capsys):
    from weight_files import SideEffect, random_ours

    monkeypatch.chdir(tmp_path)  # no ./flower_photos here, and no --data-path
    weights, marker = tmp_path / "best.pth", tmp_path / "pwned"
    if kind == "corrupt":
        weights.write_bytes(b"PK\x03\x04" + bytes(200))
    else:
        torch.save({"model": random_ours().state_dict(), "extra": SideEffect(marker)}, weights)
    rc, _, err = run_evaluate(["--weights", weights, "--device", "cpu"], capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert str(weights) in err and "Data folder" not in err
    assert not marker.exists()


def test_output_dir_that_is_a_file_is_refused_before_the_work(trained, tmp_path, capsys):
    data, ckpt = trained
    in_the_way = tmp_path / "evaluation"
    in_the_way.write_text("keep me")
    rc, out, err = run_evaluate(["--weights", ckpt, "--data-path", data, "--device", "cpu",
                                 "--output-dir", in_the_way], capsys)
    assert rc == 2 and err.startswith("error: --output-dir") and len(err.splitlines()) == 1
    assert "accuracy" not in out and in_the_way.read_text() == "keep me"


def test_negative_workers_is_bad_input(trained, tmp_path, capsys):
    data, ckpt = trained
    rc, _, err = run_evaluate(["--weights", ckpt, "--data-path", data, "--device", "cpu",
                               "--workers", "-1", "--output-dir", tmp_path / "out"], capsys)
    assert rc == 2 and err.startswith("error: --workers") and len(err.splitlines()) == 1


def test_a_failed_write_is_one_error_line(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained
    out_dir = tmp_path / "out"

    def read_only(self, *args, **kwargs):  # root ignores chmod: fail the write here
        raise PermissionError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    rc, out, err = run_evaluate(["--weights", ckpt, "--data-path", data, "--device", "cpu",
                                 "--output-dir", out_dir], capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: Cannot write {out_dir / 'metrics.json'} (Read-only")
    assert "accuracy:" in out  # the numbers were printed before the write failed
