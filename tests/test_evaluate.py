"""evaluate.py on a tiny trained checkpoint: its files exist and their numbers agree."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_error_line, run_cli
from PIL import Image
from write_faults import assert_only, files_limited_to

import evaluate
from demo_data import make_demo_flowers
from errors import WriteError
from visualize import confusion_matrix, per_class_metrics, plot_confusion_matrix

OUTPUTS = ("metrics.json", "metrics.csv", "misclassified.csv", "confusion_matrix.png",
           "class_distribution.png")


@pytest.fixture(scope="module")
def trained(trained_demo) -> tuple[Path, Path]:
    """(data folder, checkpoint): the session's demo run (conftest), trained with a
    non-default seed and validation rate, so evaluate.py must read them from the checkpoint
    to rebuild the same split."""
    return trained_demo.data, trained_demo.best


def test_outputs_exist_and_agree(trained, tmp_path):
    data, ckpt = trained
    out_dir = tmp_path / "eval"
    rc, out, _ = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--output-dir",
                                         out_dir, "--device", "cpu", "--workers", "0",
                                         "--batch-size", "4"])
    assert rc == 0
    for name in OUTPUTS:
        assert (out_dir / name).is_file(), name
    for name in ("confusion_matrix.png", "class_distribution.png"):
        with Image.open(out_dir / name) as picture:
            assert picture.format == "PNG"

    metrics = json.loads((out_dir / "metrics.json").read_text())
    cm = torch.tensor(metrics["confusion_matrix"])
    total, correct = int(cm.sum()), int(cm.diag().sum())
    assert total == metrics["num_images"] == 15  # int(12 * 0.25) = 3 per class for validation
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


def test_all_evaluates_every_image(trained, tmp_path):
    data, ckpt = trained
    rc, _, _ = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--output-dir",
                                       tmp_path, "--device", "cpu", "--workers", "0", "--all"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["subset"] == "all" and metrics["num_images"] == 60
    assert [c["support"] for c in metrics["classes"].values()] == [12] * 5


def test_data_folder_with_other_classes_exits_2(trained, tmp_path):
    _, ckpt = trained
    other = make_demo_flowers(tmp_path / "flowers", per_class=2)
    (other / "tulips").rename(other / "orchids")
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", other, "--device",
                                           "cpu", "--output-dir", tmp_path / "eval"])
    assert rc == 2 and err.startswith("error: ") and "orchids" in err
    assert not (tmp_path / "eval").exists()


def test_missing_checkpoint_exits_2(tmp_path):
    rc, _, err = run_cli(evaluate.main, ["--weights", tmp_path / "none.pth", "--device", "cpu"])
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
def test_bad_weights_are_blamed_before_the_missing_data_folder(kind, tmp_path, monkeypatch):
    from weight_files import SideEffect, random_ours

    monkeypatch.chdir(tmp_path)  # no ./flower_photos here, and no --data-path
    weights, marker = tmp_path / "best.pth", tmp_path / "pwned"
    if kind == "corrupt":
        weights.write_bytes(b"PK\x03\x04" + bytes(200))
    else:
        torch.save({"model": random_ours().state_dict(), "extra": SideEffect(marker)}, weights)
    rc, _, err = run_cli(evaluate.main, ["--weights", weights, "--device", "cpu"])
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert str(weights) in err and "Data folder" not in err
    assert not marker.exists()


# --------------------------------------------------------------------------- the numbers written,
# checked against values computed by hand on a known confusion matrix

HAND_CM = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows: true class; 4 of 6 right
HAND = {  # precision = diagonal / column sums, recall = diagonal / row sums
    "a": {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3},
    "b": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
    "c": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
    "macro avg": {"precision": 2 / 3, "recall": 13 / 18, "f1": 59 / 90, "support": 6},
    # weighted by support 3, 2, 1: (3 * 1 + 2 * .5 + .5) / 6 ...
    "weighted avg": {"precision": 0.75, "recall": 4 / 6, "f1": 61 / 90, "support": 6},
}


def test_metrics_json_and_every_csv_column_equal_hand_computed_values(tmp_path):
    metrics = evaluate.metrics_dict(torch.tensor(HAND_CM), ["a", "b", "c"])
    assert metrics["num_images"] == 6 and metrics["correct"] == 4
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    for name in "abc":
        assert metrics["classes"][name] == pytest.approx(HAND[name])
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        expected = {k: v for k, v in HAND[label].items() if k != "support"}
        assert metrics[key] == pytest.approx(expected)
    evaluate.write_metrics_csv(metrics, tmp_path / "metrics.csv")
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == [*"abc", "macro avg", "weighted avg"]
    for row in rows:
        expected = HAND[row["class"]]
        assert set(row) == {"class", "precision", "recall", "f1", "support"}
        for column in ("precision", "recall", "f1"):
            assert float(row[column]) == pytest.approx(expected[column], abs=1e-6), row
        assert int(row["support"]) == expected["support"]


def test_misclassified_csv_lists_the_most_confident_mistakes_first(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.05, 0.95], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 0, 1])  # images 1, 2 and 3 are wrong: 0.7, 0.6, 0.95
    result = evaluate.Evaluation(["a", "b"], [Path(f"img{i}.jpg") for i in range(5)],
                                 labels, probs)
    assert evaluate.write_misclassified(result, tmp_path / "wrong.csv") == 3
    with (tmp_path / "wrong.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["true"], r["predicted"], r["prob"]) for r in rows] == [
        ("img3.jpg", "a", "b", "0.9500"), ("img1.jpg", "a", "b", "0.7000"),
        ("img2.jpg", "a", "b", "0.6000")]


def test_seed_and_val_rate_flags_choose_the_split_evaluated(trained, tmp_path):
    from predict import load_classifier, predict_probs
    from utils import read_split_data

    data, ckpt = trained
    rc, _, _ = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--output-dir",
                                       tmp_path, "--device", "cpu", "--workers", "0", "--seed", "7",
                                       "--val-rate", "0.5"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 30 and metrics["seed"] == 7  # 6 of 12 per class
    assert [c["support"] for c in metrics["classes"].values()] == [6] * 5
    # The confusion matrix of exactly that split's validation images.
    split = read_split_data(data, 0.5, 7)
    model, _ = load_classifier(ckpt)
    probs = predict_probs(model, split.val_images, torch.device("cpu"), workers=0)
    expected = confusion_matrix(probs.argmax(1), torch.tensor(split.val_labels), 5)
    assert metrics["confusion_matrix"] == expected.tolist()


# --------------------------------------------------------------------------- --html


class PageParser(HTMLParser):
    """What the tests read of the report: images, links, the table's rows, the cards."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self.cards: list[dict] = []
        self.tags: set[str] = set()
        self._in_table = self._in_cell = self._in_path = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.sources.append(attrs["src"])
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])
        if tag == "table":
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self._in_cell = True
            self.rows[-1].append("")
        elif tag == "article":
            self.cards.append({"wrong": "wrong" in attrs.get("class", ""), "path": ""})
        elif tag == "p" and attrs.get("class") == "path":
            self._in_path = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th"):
            self._in_cell = False
        elif tag == "p":
            self._in_path = False

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data
        if self._in_path:
            self.cards[-1]["path"] += data


def read_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_html_report_stands_alone_and_agrees_with_metrics_json(trained, tmp_path):
    data, ckpt = trained
    out_dir, page = tmp_path / "eval", tmp_path / "pages" / "report.html"
    rc, out, _ = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--output-dir",
                                         out_dir, "--device", "cpu", "--workers", "0", "--html",
                                         page])
    assert rc == 0 and f"Report: {page}" in out
    parsed = read_page(page)
    metrics = json.loads((out_dir / "metrics.json").read_text())

    # Every picture is an embedded PNG; nothing points outside the file, nothing is scripted.
    assert parsed.sources and "script" not in parsed.tags
    for source in parsed.sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(source[len(prefix):]))) as picture:
            assert picture.format == "PNG"
            picture.load()
    assert not any("http" in link for link in parsed.links + parsed.sources)
    assert "http" not in page.read_text().replace("http-equiv", "")

    # The table's numbers are metrics.json's.
    header, *rows = parsed.rows
    assert header == ["class", "precision", "recall", "F1", "support"]
    table = {row[0]: row[1:] for row in rows}
    expected = {**metrics["classes"], "macro avg": {**metrics["macro_avg"],
                                                     "support": metrics["num_images"]},
                "weighted avg": {**metrics["weighted_avg"], "support": metrics["num_images"]}}
    assert set(table) == set(expected)
    for name, values in expected.items():
        for cell, key in zip(table[name], ("precision", "recall", "f1"), strict=False):
            assert float(cell) == pytest.approx(values[key], abs=5e-5), (name, key)
        assert int(table[name][3]) == values["support"]

    # Every misclassified file appears once, as a misclassified card; correct ones apart.
    with (out_dir / "misclassified.csv").open() as f:
        wrong = [row["path"] for row in csv.DictReader(f)]
    assert wrong, "the two-epoch model should make mistakes for this test to mean anything"
    shown = [card["path"] for card in parsed.cards if card["wrong"]]
    assert shown == wrong  # once each, in the same order: the most confident first
    right = [card["path"] for card in parsed.cards if not card["wrong"]]
    assert not set(right) & set(wrong)
    assert len(right) == metrics["correct"] or len(right) == 3 * len(metrics["class_names"])
    assert len(parsed.sources) == 3 * len(parsed.cards) + 1 + 2  # cards, matrix, two curves


def test_html_report_without_the_run_says_so(trained, tmp_path):
    data, ckpt = trained
    alone = tmp_path / "alone" / "weights.pth"
    alone.parent.mkdir()
    alone.write_bytes(ckpt.read_bytes())  # no model-*.pth beside it: the run is unknown
    page = tmp_path / "report.html"
    rc, _, _ = run_cli(evaluate.main, ["--weights", alone, "--data-path", data, "--output-dir",
                                       tmp_path, "--device", "cpu", "--workers", "0", "--html",
                                       page])
    assert rc == 0
    text = page.read_text()
    assert "so there are no curves" in text and 'alt="training curve"' not in text


def test_the_report_curves_follow_a_run_resumed_with_another_log_dir(tmp_path):
    import report
    from checkpoints import Checkpoint, epoch_file, peek_checkpoint, save_checkpoint

    folders = ["runs/20261128-101500", "elsewhere/20261128-101500",  # resumed, moved
               "runs/20261128-120000"]                             # another run's file
    for epoch, log_dir in enumerate(folders):
        save_checkpoint(Checkpoint(model={}, model_args={}, epoch=epoch, log_dir=log_dir,
                                   metrics={"train_acc": 0.5, "val_acc": 0.1 * (epoch + 1),
                                            "train_loss": 1.0, "val_loss": 1.0}),
                        tmp_path / epoch_file(epoch))
    newest = tmp_path / epoch_file(1)
    curves = report.validation_curves(newest, peek_checkpoint(newest))
    assert curves["accuracy"]["validation"] == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}


def test_gallery_lists_every_mistake_and_the_first_correct_images_of_each_class():
    import report

    # Class 0: more mistakes than the gallery shows, growing in confidence, then 5 right;
    # class 1: 2 right.
    wrong = report.MAX_MISTAKES + 2
    confidence = torch.linspace(0.55, 0.95, wrong)
    probs = torch.cat([torch.stack([1 - confidence, confidence], dim=1),
                       torch.tensor([[0.9, 0.1]] * 5 + [[0.2, 0.8]] * 2)])
    labels = torch.tensor([0] * (wrong + 5) + [1] * 2)
    mistakes, correct = report.gallery_indices(probs, labels)
    assert mistakes == list(range(wrong))[::-1]  # every one, the most confident first
    assert correct == [wrong, wrong + 1, wrong + 2, wrong + 5, wrong + 6]


def test_html_report_escapes_what_it_did_not_write():
    import report

    card = report.Card(Path("<script>alert(1)</script>.jpg"), "a&b", "<u>", [("<u>", 0.5)],
                       [("<s>", "data:image/png;base64,")])
    page = report._card_html(card, wrong=True)
    assert "<script>" not in page and "<u>" not in page and "<s>" not in page
    assert "&lt;script&gt;" in page and "a&amp;b" in page


@pytest.mark.parametrize("html, needle", [
    ("report.pdf", "--html {page} needs one of the suffixes .html, .htm"),
    ("a_folder.html", "--html {page} is a folder"),
    ("a_file/report.html", "Cannot write {page}: {tmp}/a_file is a file, not a folder"),
])
def test_html_path_must_be_an_html_file_that_can_be_written(trained, tmp_path, html,
                                                            needle):
    data, ckpt = trained
    (tmp_path / "a_folder.html").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    page = tmp_path / html
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                           "cpu", "--output-dir", tmp_path / "eval", "--html",
                                           page])
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: " + needle.format(page=page, tmp=tmp_path))
    assert not (tmp_path / "eval").exists()  # refused before the evaluation
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_output_dir_that_is_a_file_is_refused_before_the_work(trained, tmp_path):
    data, ckpt = trained
    in_the_way = tmp_path / "evaluation"
    in_the_way.write_text("keep me")
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                           "cpu", "--output-dir", in_the_way])
    assert rc == 2 and err.startswith("error: --output-dir") and len(err.splitlines()) == 1
    assert "accuracy" not in out and in_the_way.read_text() == "keep me"


def test_negative_workers_is_bad_input(trained, tmp_path):
    data, ckpt = trained
    rc, _, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device", "cpu",
                                         "--workers", "-1", "--output-dir", tmp_path / "out"])
    assert rc == 2 and err.startswith("error: --workers") and len(err.splitlines()) == 1


def test_a_failed_write_is_one_error_line(trained, tmp_path, monkeypatch):
    data, ckpt = trained
    out_dir = tmp_path / "out"

    def read_only(self, *args, **kwargs):  # root ignores chmod: fail the write here
        raise PermissionError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)  # what metrics.json is written with
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                           "cpu", "--output-dir", out_dir])
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: Cannot write {out_dir / 'metrics.json'} (Read-only")
    assert "accuracy:" in out  # the numbers were printed before the write failed


@pytest.mark.parametrize("flag, name", [("--output-dir", ""), ("--output-dir", "eval"),
                                        ("--html", "report.html")])
def test_a_folder_that_refuses_files_is_refused_before_the_work(trained, tmp_path,
                                                                 unwritable_folder, flag, name):
    # Found before the model is loaded, not after the table is printed and the other
    # results written: one line, exit 2, nothing written anywhere.
    data, ckpt = trained
    target = unwritable_folder / name if name else unwritable_folder
    folders = {"--output-dir": tmp_path / "eval", flag: target}
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                           "cpu", *(a for pair in folders.items() for a in pair)])
    line = one_error_line(rc, err)
    assert line.startswith(f"error: {flag} {target}: no file can be created in "
                           f"{unwritable_folder} ("), line
    assert line.endswith("; check the folder's permissions.")
    assert out == "" and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999999"])
def test_a_seed_outside_what_torch_accepts_is_bad_input(trained, tmp_path, seed):
    data, ckpt = trained
    rc, out, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                           "cpu", "--seed", seed, "--output-dir",
                                           tmp_path / "eval"])
    assert one_error_line(rc, err) == f"error: --seed must be in [0, 2**32), got {seed}."
    assert out == "" and not (tmp_path / "eval").exists()


def test_the_largest_seed_is_accepted(trained, tmp_path):
    data, ckpt = trained
    rc, _, err = run_cli(evaluate.main, ["--weights", ckpt, "--data-path", data, "--device",
                                         "cpu", "--seed", str(2**32 - 1), "--output-dir",
                                         tmp_path / "eval"])
    assert rc == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["seed"] == 2**32 - 1


def test_report_py_run_as_a_command_names_the_command_that_writes_its_page():
    result = subprocess.run([sys.executable, "report.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: report.py has no command of its own; the page is written "
                             "by python evaluate.py --html report.html\n")


# --------------------------------------------------------------------------- a full disk

def evaluate_argv(trained, out_dir: Path, *extra: object) -> list[object]:
    data, ckpt = trained
    return ["--weights", ckpt, "--data-path", data, "--device", "cpu", "--workers", "0",
            "--output-dir", out_dir, *extra]


def test_a_full_disk_keeps_the_last_evaluation_whole(trained, tmp_path):
    # Each output went straight to its name: a full disk left 0-byte files in their place.
    out_dir, page = tmp_path / "eval", tmp_path / "eval" / "report.html"
    assert run_cli(evaluate.main, evaluate_argv(trained, out_dir, "--html", page))[0] == 0
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    assert set(before) == {*OUTPUTS, "report.html"}
    with files_limited_to(0):
        code, _, err = run_cli(evaluate.main, evaluate_argv(trained, out_dir, "--html", page))
    line = one_error_line(code, err, status=1)
    assert line == (f"error: Cannot write {out_dir / 'metrics.json'} (File too large); check "
                    f"the folder and the free space.")
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


def write_each_output(name: str, path: Path) -> None:
    """Write evaluate.py's output `name` to path, from a small hand-made evaluation."""
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]])
    result = evaluate.Evaluation(["a", "b"], [Path(f"img{i}.jpg") for i in range(3)],
                                 torch.tensor([0, 0, 1]), probs)
    metrics = evaluate.metrics_dict(result.confusion, result.class_names)
    if name == "metrics.csv":
        evaluate.write_metrics_csv(metrics, path)
    elif name == "misclassified.csv":
        evaluate.write_misclassified(result, path)
    else:
        evaluate.save_figure(plot_confusion_matrix(result.confusion, result.class_names), path)


@pytest.mark.parametrize("name", ["metrics.csv", "misclassified.csv", "confusion_matrix.png"])
def test_each_output_on_a_full_disk_keeps_the_old_file(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"the last evaluation's")
    with files_limited_to(10), pytest.raises(WriteError, match="File too large"):
        write_each_output(name, target)
    assert target.read_bytes() == b"the last evaluation's"
    assert_only(tmp_path, [name])
    write_each_output(name, target)  # with room, the new file replaces the old
    assert target.read_bytes() != b"the last evaluation's"
    assert_only(tmp_path, [name])


def test_a_damaged_best_pth_says_to_use_the_runs_other_checkpoints(trained, trained_demo,
                                                                     tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pth", "model-0.pth"):
        shutil.copy(trained_demo.output_dir / name, run / name)
    (run / "best.pth").write_bytes((run / "best.pth").read_bytes()[:1000])
    data, _ = trained
    code, out, err = run_cli(evaluate.main, evaluate_argv((data, run / "best.pth"),
                                                          tmp_path / "eval"))
    line = one_error_line(code, err)
    assert line.endswith(f"pass one of the run's model-*.pth in {run} instead, or rebuild it "
                         f"by running the run's train.py command again with --resume auto "
                         f"--output-dir {run}."), line
    assert "download" not in line and out == ""
    assert not (tmp_path / "eval").exists()
