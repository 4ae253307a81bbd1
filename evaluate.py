"""Evaluate a checkpoint on a data folder: accuracy, per-class metrics, pictures, mistakes.

    python evaluate.py --weights weights/best.pth                 # the validation split
    python evaluate.py --weights weights/best.pth --all           # every image in the folder
    python evaluate.py --weights weights/best.pth --data-path other_flowers --all
    python evaluate.py --weights weights/best.pth --html evaluation/report.html

The validation split is rebuilt as train.py made it: the seed and validation rate come
from the checkpoint's "args" (train.py's defaults, 0 and 0.2, for files that lack them),
and the data folder too unless --data-path is given. Writes to --output-dir:

    metrics.json            accuracy, per-class precision / recall / F1, confusion matrix
    metrics.csv             the per-class table
    confusion_matrix.png
    class_distribution.png  train / validation images per class
    misclassified.csv       path, true, predicted, prob (most confident mistakes first)

and with --html PATH one self-contained page of all this, the training curves and a gallery
of the mistakes with their attention and Grad-CAM maps (report.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import atomic_write_text, read_train_args, write_atomically
from cli import add_device_flag, add_weights_flags, run_main
from download import FLOWERS_DIR
from errors import UserError, check_output_dir, make_output_dir
from predict import check_figure_path, load_classifier, predict_probs, resolve_weights
from report import HTML_SUFFIXES, write_html_report
from utils import DEFAULT_SEED, DEFAULT_VAL_RATE, read_split_data, seed_problem, select_device
from visualize import (
    confusion_matrix,
    misclassified_indices,
    per_class_metrics,
    plot_class_distribution,
    plot_confusion_matrix,
    save_figure,
)

# What train.py uses when a checkpoint does not say.
TRAIN_DEFAULTS = {"data_path": f"./{FLOWERS_DIR}", "seed": DEFAULT_SEED,
                  "val_rate": DEFAULT_VAL_RATE}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint: accuracy, per-class metrics, confusion matrix.")
    add_weights_flags(parser)
    parser.add_argument("--data-path", default=None,
                        help="folder with one sub-folder per class (default: the one the "
                             "checkpoint was trained on)")
    parser.add_argument("--all", action="store_true",
                        help="evaluate every image in the folder, not only the validation split")
    parser.add_argument("--output-dir", default="./evaluation", help="where the results go")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the split, below 2**32 (default: the checkpoint's)")
    parser.add_argument("--val-rate", type=float, default=None,
                        help="validation fraction of the split (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None,
                        help="image-loading processes (default: up to 4)")
    add_device_flag(parser)
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="also write one self-contained HTML page: the facts of the run, "
                             "the metrics, the curves and the mistakes with their attention "
                             "and Grad-CAM maps")
    return parser


@dataclass
class Evaluation:
    class_names: list[str]
    paths: list[Path]
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor   # (N, C)

    @property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(dim=1)

    @property
    def confusion(self) -> torch.Tensor:
        return confusion_matrix(self.preds, self.labels, len(self.class_names))


def metrics_dict(cm: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, per-class and averaged precision / recall / F1, from the confusion matrix
    alone, so every number written agrees with the picture."""
    per_class = per_class_metrics(cm)
    support = per_class["support"].double()
    total = int(cm.sum())
    names = ("precision", "recall", "f1")
    return {
        "num_images": total,
        "correct": int(cm.diag().sum()),
        "accuracy": cm.diag().sum().item() / max(total, 1),
        "classes": {name: {**{m: per_class[m][i].item() for m in names},
                           "support": int(per_class["support"][i])}
                    for i, name in enumerate(class_names)},
        "macro_avg": {m: per_class[m].mean().item() for m in names},
        "weighted_avg": {m: (per_class[m] * support).sum().item() / max(total, 1)
                         for m in names},
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),  # rows: true class, columns: predicted
    }


def format_table(metrics: dict) -> str:
    width = max(12, *(len(n) for n in metrics["class_names"]))
    lines = [f"{'class':<{width}}  precision  recall  f1-score  support"]
    for name, row in metrics["classes"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                     f"{row['f1']:8.4f}  {row['support']:7d}")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = metrics[key]
        lines.append(f"{label:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                     f"{row['f1']:8.4f}  {metrics['num_images']:7d}")
    lines.append(f"accuracy: {metrics['accuracy']:.4f} "
                 f"({metrics['correct']} of {metrics['num_images']} images)")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[list]) -> None:
    """rows, the header first, as a CSV file, atomically (a failed write keeps the old file)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)

    write_atomically(path, write)


def write_metrics_csv(metrics: dict, path: Path) -> None:
    rows = [["class", "precision", "recall", "f1", "support"]]
    for name, row in metrics["classes"].items():
        rows.append([name, f"{row['precision']:.6f}", f"{row['recall']:.6f}",
                     f"{row['f1']:.6f}", row["support"]])
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = metrics[key]
        rows.append([label, f"{row['precision']:.6f}", f"{row['recall']:.6f}",
                     f"{row['f1']:.6f}", metrics["num_images"]])
    write_csv(path, rows)


def write_misclassified(result: Evaluation, path: Path) -> int:
    """One row per wrong prediction, the most confident first; returns the row count."""
    preds, names = result.preds, result.class_names
    wrong = misclassified_indices(result.probs, result.labels)
    confidence = result.probs.max(dim=1).values
    rows = [["path", "true", "predicted", "prob"]]
    rows += [[str(result.paths[i]), names[result.labels[i]], names[preds[i]],
              f"{confidence[i].item():.4f}"] for i in wrong]
    write_csv(path, rows)
    return len(wrong)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if problem := seed_problem(args.seed):
        raise UserError(problem)
    check_output_dir(args.output_dir, "--output-dir")  # made only once the inputs are good
    if args.html is not None:
        check_figure_path(args.html, "--html", HTML_SUFFIXES)
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more.")
    weights_path = resolve_weights(args.weights)
    # The weights first: a broken file is the problem to report even when the data folder
    # it names is missing too.
    model, class_names = load_classifier(weights_path, args.class_indices, args.model_name)
    trained_with = read_train_args(weights_path)  # cheap even for ViT-B
    settings = {}
    for key, default in TRAIN_DEFAULTS.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else trained_with.get(key, default)
    if not trained_with and (args.seed is None or args.val_rate is None):
        print(f"note: {weights_path} does not record how it was trained; splitting with "
              f"seed {settings['seed']} and val rate {settings['val_rate']}.", file=sys.stderr)
    data_path = Path(settings["data_path"])
    if not data_path.is_dir():
        origin = "given" if args.data_path else "the checkpoint was trained on"
        what = "is not a folder" if data_path.exists() else "does not exist"
        raise UserError(f"Data folder {data_path} ({origin}) {what}; pass --data-path.")

    split = read_split_data(data_path, settings["val_rate"], settings["seed"],
                            warn=lambda text: print(text, file=sys.stderr))
    device = select_device(args.device)
    if split.class_names != class_names:
        raise UserError(f"{data_path} has the classes {', '.join(split.class_names)} but "
                        f"{weights_path} was trained on {', '.join(class_names)}.")
    if args.all:
        paths = split.train_images + split.val_images
        labels = split.train_labels + split.val_labels
        subset = "all"
    else:
        paths, labels, subset = split.val_images, split.val_labels, "validation"
    if not paths:
        raise UserError(f"The split of {data_path} (val rate {settings['val_rate']}) has no "
                        f"validation images; pass --all to evaluate every image.")
    print(f"Evaluating {weights_path} on {len(paths)} {subset} images of {data_path} "
          f"(split seed {settings['seed']}, val rate {settings['val_rate']}).")

    out = make_output_dir(args.output_dir, "--output-dir")
    probs = predict_probs(model, paths, device, args.batch_size, args.workers)
    result = Evaluation(class_names, paths, torch.tensor(labels), probs)
    cm = result.confusion
    metrics = metrics_dict(cm, class_names)
    print(format_table(metrics))

    report = {"weights": str(weights_path), "data_path": str(data_path), "subset": subset,
              "seed": settings["seed"], "val_rate": settings["val_rate"], **metrics}
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_metrics_csv(metrics, out / "metrics.csv")
    write_misclassified(result, out / "misclassified.csv")
    title = f"Confusion matrix, {subset} images"
    save_figure(plot_confusion_matrix(cm, class_names, title), out / "confusion_matrix.png")
    train_counts = [split.train_labels.count(i) for i in range(len(class_names))]
    val_counts = [split.val_labels.count(i) for i in range(len(class_names))]
    save_figure(plot_class_distribution(class_names, train_counts, val_counts,
                                        f"{data_path.name} class distribution"),
                out / "class_distribution.png")
    print(f"Results in {out}: metrics.json, metrics.csv, misclassified.csv, "
          f"confusion_matrix.png, class_distribution.png")
    if args.html:
        write_html_report(Path(args.html), report, weights_path, model, args.model_name,
                          paths, result.labels, probs, device, args.batch_size)
        print(f"Report: {args.html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
