"""Run the report's three experiments with train.py and compare them with the report.

    python reproduce.py                                # the real runs (hours on one GPU)
    python reproduce.py --out reproduce -- --batch-size 32 --workers 8   # extra train.py flags
    python reproduce.py --quick                        # minutes on a CPU: synthetic, a check only

| run | weights                 | trained        | epochs | report's val acc |
|-----|-------------------------|----------------|--------|------------------|
| 1   | ImageNet-21k ViT-B/16   | head only      | 10     | 98.1%            |
| 2   | ImageNet-21k ViT-B/16   | whole network  | 10     | 97.8%            |
| 3   | none (from scratch)     | whole network  | 48     | 72.6%            |

Each run trains into --out/runN/weights (checkpoints) and --out/runN/runs (TensorBoard).
A run whose last epoch's checkpoint is already there is not trained again (delete its
folder to retrain), and an interrupted one resumes from its newest checkpoint
(train.py --resume auto), so a stopped reproduction picks up where it stopped. Then
--out/results.md gets the table of best validation accuracies beside the report's, and
--out/val_acc.png the three validation-accuracy curves. Arguments after `--` go to every
train.py call and win over the ones given here, except the ones each run sets (its folders,
data, weights, epochs, --freeze-layers and --resume), which are refused.

--quick trains the small demo ViT on synthetic flowers (demo_data.py), and stands in for
the ImageNet-21k weights with a demo model trained from scratch on the same data first.
It checks that the pipeline works; its numbers mean nothing for ViT-B/16 on flower_photos.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import train
from checkpoints import (
    BEST_FILE,
    DEFAULT_OUTPUT_DIR,
    atomic_write_text,
    epoch_file,
    read_progress,
)
from cli import INTERRUPTED_STATUS, TERMINATED_STATUS, run_main
from demo_data import make_demo_flowers
from download import FLOWERS_DIR
from errors import ProjectError, UserError, check_output_file


@dataclass(frozen=True)
class Run:
    name: str
    pretrained: bool
    frozen: bool
    epochs: int
    report_acc: float  # the report's validation accuracy, a fraction

    @property
    def trained_part(self) -> str:
        return "head only" if self.frozen else "whole network"


RUNS = (Run("1", True, True, 10, 0.981), Run("2", True, False, 10, 0.978),
        Run("3", False, False, 48, 0.726))
# Paper Table 5, ViT-B/16 pretrained on ImageNet-21k, fine-tuned at 384 px (top-1, %).
PAPER_TABLE5 = {"Oxford Flowers-102": 99.38, "Oxford-IIIT Pets": 94.43, "CIFAR-10": 98.95,
                "CIFAR-100": 91.67, "ImageNet": 83.97}
QUICK_EPOCHS = {"pretrain": 4, "1": 3, "2": 3, "3": 6}
QUICK_MODEL = train.DEMO_SETTINGS["model_name"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the report's three experiments and write results.md.",
        epilog="Arguments after -- are passed to every train.py call (not the flags that "
               "each run sets: its folders, data, weights, epochs, --freeze-layers, --resume).")
    parser.add_argument("--out", default="./reproduce", help="folder for the runs and results")
    parser.add_argument("--data-path", default=None,
                        help=f"flower_photos (default: ./{FLOWERS_DIR}; with --quick "
                             f"{train.DEMO_DATA}, generated when missing)")
    parser.add_argument("--weights", default=train.DEFAULT_WEIGHTS,
                        help="ImageNet-21k ViT-B/16 weights for runs 1 and 2 "
                             "(python download.py weights)")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic data, the demo ViT, the CPU, a few epochs: a check")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every run's epochs by this (at least 1 epoch each)")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, train.py's): everything after the first `--` goes to train.py."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def scaled(epochs: int, scale: float) -> int:
    return max(1, round(epochs * scale))


def run_folder(out: Path, name: str) -> tuple[Path, Path]:
    return out / name / DEFAULT_OUTPUT_DIR, out / name / "runs"


def train_argv(run: Run, args: argparse.Namespace, out: Path, pretrained: str) -> list[str]:
    weights_dir, log_dir = run_folder(out, f"run{run.name}")
    epochs = QUICK_EPOCHS[run.name] if args.quick else run.epochs
    return ["--data-path", args.data_path, "--weights", pretrained if run.pretrained else "",
            "--freeze-layers" if run.frozen else "--no-freeze-layers",
            "--epochs", str(scaled(epochs, args.epochs_scale)),
            "--output-dir", str(weights_dir), "--log-dir", str(log_dir), "--resume", "auto"]


def pretrain_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """--quick's pretraining, the stand-in for the ImageNet-21k weights of runs 1 and 2."""
    weights_dir, log_dir = run_folder(out, "pretrain")
    return ["--data-path", args.data_path, "--weights", "", "--no-freeze-layers",
            "--epochs", str(scaled(QUICK_EPOCHS["pretrain"], args.epochs_scale)),
            "--output-dir", str(weights_dir), "--log-dir", str(log_dir), "--resume", "auto"]


# The train.py flags that train_argv and pretrain_argv set for each run (by their argparse
# names), which arguments after `--` may not change, and what to do instead.
SET_FOR_EACH_RUN = {
    "output_dir": "every run has its own folders under --out; pass another --out",
    "log_dir": "every run has its own folders under --out; pass another --out",
    "data_path": "pass reproduce.py's own --data-path, before the --",
    "weights": "pass reproduce.py's own --weights, before the --",
    "epochs": "scale the report's epochs with --epochs-scale",
    "freeze_layers": "run 1 trains the head only, runs 2 and 3 the whole network",
    "resume": "every run resumes by itself when the same command is run again",
}


def check_extra(extra: list[str]) -> None:
    """Refuse an argument after `--` that would override what each run sets: with
    --output-dir, say, all three runs would train into one folder and report one number."""
    given = train.given_options(extra)  # argparse's reading: abbreviations, --flag=value
    for name, instead in SET_FOR_EACH_RUN.items():
        if name in given:
            raise UserError(f"--{name.replace('_', '-')} cannot follow --: reproduce.py sets "
                            f"it for each run; {instead}.")
    if "demo" in given:  # it would swap the model of the full runs for the demo's
        raise UserError("--demo cannot follow --: pass --quick for the synthetic data and the "
                        "demo ViT.")


def quick_settings() -> list[str]:
    # The demo settings train.py's --demo uses, so the small model learns in a few epochs.
    demo = train.DEMO_SETTINGS
    return ["--model-name", QUICK_MODEL, "--device", "cpu",
            "--batch-size", str(demo["batch_size"]), "--lr", str(demo["lr"])]


def train_once(label: str, argv: list[str]) -> Path:
    """train.main(argv) unless that run already finished; returns its checkpoint folder."""
    settings = train.get_args_parser().parse_args(argv)  # what train.py will see, `--` included
    weights_dir = Path(settings.output_dir)
    if (weights_dir / epoch_file(settings.epochs - 1)).is_file() and (
            weights_dir / BEST_FILE).is_file():
        print(f"{label}: already trained in {weights_dir} (delete it to train again).")
        return weights_dir
    print(f"{label}: python train.py {' '.join(repr(a) if not a else a for a in argv)}",
          flush=True)
    rc = train.main(argv)
    if rc in (INTERRUPTED_STATUS, TERMINATED_STATUS):  # Ctrl-C or SIGTERM, which train.py
        raise RunStopped(rc)                           # turned into its exit status
    if rc != 0:
        raise RunFailed(f"{label} failed (train.py exit status {rc}); its messages are above.",
                        rc)
    return weights_dir


class RunStopped(Exception):
    """train.py stopped at Ctrl-C or SIGTERM, saving what it had; status is its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class RunFailed(ProjectError):
    """One of the runs failed: reproduce.py exits with train.py's status."""

    def __init__(self, message: str, rc: int) -> None:
        super().__init__(message)
        self.exit_code = rc


@dataclass
class Result:
    run: Run
    best_acc: float
    best_epoch: int  # counted from 1
    curve: dict[int, float]  # epoch (from 1) -> val_acc, for the epoch checkpoints kept
    epochs: int


def read_result(run: Run, weights_dir: Path, epochs: int) -> Result:
    best = read_progress(weights_dir / BEST_FILE)
    if best is None or "val_acc" not in best[1]:
        raise UserError(f"{weights_dir / BEST_FILE} is missing or has no metrics.")
    curve = {}
    for epoch in range(epochs):
        progress = read_progress(weights_dir / epoch_file(epoch))
        if progress is not None:  # train.py --keep N deletes the older ones
            curve[epoch + 1] = progress[1]["val_acc"]
    return Result(run, best[1]["val_acc"], best[0] + 1, curve, epochs)


def results_markdown(results: list[Result], args: argparse.Namespace, pretrained: str,
                     command: str) -> str:
    lines = ["# Reproduction of the report's three runs", ""]
    if args.quick:
        lines += [
            "> **Quick mode: synthetic and not comparable.** These runs train the 0.8M-parameter "
            f"demo ViT (`{QUICK_MODEL}`, 64 px) on cartoon flowers drawn by `demo_data.py` in "
            f"`{args.data_path}`, on the CPU, for a few epochs. The \"pretrained\" weights of "
            f"runs 1 and 2 are a demo model trained from scratch on the same synthetic training "
            f"split (`{pretrained}`), not ImageNet-21k. The numbers only show that the pipeline "
            "runs end to end; the report's and the paper's columns are there for the layout.",
            ""]
    lines += [f"Command: `{command}`", "",
              f"Data: `{args.data_path}`; weights for runs 1 and 2: `{pretrained}`.", "",
              "| run | start from | trained | epochs | best val acc (this run) | at epoch "
              "| report |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        start = ("demo model (synthetic pretraining)" if args.quick else "ImageNet-21k ViT-B/16"
                 ) if r.run.pretrained else "random init (from scratch)"
        epoch = str(r.best_epoch) if r.best_epoch > 0 else "?"
        lines.append(f"| {r.run.name} | {start} | {r.run.trained_part} | {r.epochs} | "
                     f"{100 * r.best_acc:.1f}% | {epoch} | {100 * r.run.report_acc:.1f}% |")
    partial = [r.run.name for r in results if len(r.curve) < r.epochs]
    lines += ["", "Epochs are counted from 1. The report's column is the reproduced report's "
              "validation accuracy on flower_photos (731 validation images).", "",
              "![validation accuracy per epoch](val_acc.png)", ""]
    if partial:
        lines += [f"The curves of run(s) {', '.join(partial)} show only the epochs whose "
                  "checkpoints were kept (train.py --keep).", ""]
    lines += [
              "For context only, the paper's Table 5 (Dosovitskiy et al. 2021): ViT-B/16 "
              "pretrained on ImageNet-21k and fine-tuned at 384 px with the paper's recipe. "
              "These are other data sets (Oxford Flowers-102 has 102 classes; flower_photos, "
              "used here, has 5) and another recipe, so they are not targets for this table.",
              "", "| " + " | ".join(PAPER_TABLE5) + " |",
              "|" + "---|" * len(PAPER_TABLE5),
              "| " + " | ".join(f"{v:.2f}" for v in PAPER_TABLE5.values()) + " |", ""]
    return "\n".join(lines)


def check_epochs_scale(scale: float) -> None:
    """A positive number that leaves every run a countable number of epochs."""
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"--epochs-scale must be a positive number, not {scale}.")
    longest = max(RUNS, key=lambda run: run.epochs)  # --quick's runs are all shorter
    if not math.isfinite(longest.epochs * scale):  # round() of an infinity: OverflowError
        raise UserError(f"--epochs-scale {scale} is too large: run {longest.name}'s "
                        f"{longest.epochs} epochs times it is more than a number can hold.")


def run_all(args: argparse.Namespace, extra: list[str], command: str) -> int:
    check_epochs_scale(args.epochs_scale)
    check_extra(extra)
    out = Path(args.out)
    check_output_file(out / "results.md", "--out")  # before hours of training, not after
    if args.quick:
        args.data_path = args.data_path or str(train.DEMO_DATA)
        if not Path(args.data_path).is_dir():
            print(f"Quick mode: writing synthetic flower images to {args.data_path}.")
            make_demo_flowers(args.data_path)
        common = quick_settings()
        pretrain_dir = train_once("pretraining (quick mode's stand-in for ImageNet-21k)",
                                  pretrain_argv(args, out) + common + extra)
        pretrained = str(pretrain_dir / BEST_FILE)
    else:
        args.data_path = args.data_path or f"./{FLOWERS_DIR}"
        if Path(args.data_path).exists() and not Path(args.data_path).is_dir():
            raise UserError(f"--data-path {args.data_path} is a file; pass the folder of class "
                            f"folders (python download.py flowers makes ./{FLOWERS_DIR}).")
        if not Path(args.data_path).is_dir():
            raise UserError(f"Data folder {args.data_path} does not exist: python download.py "
                            f"flowers, or pass --data-path (or --quick for synthetic data).")
        if not Path(args.weights).is_file():
            raise UserError(f"Weights file {args.weights} for runs 1 and 2 is not a file: "
                            f"python download.py weights, or pass --weights.")
        common, pretrained = [], args.weights

    results = []
    for run in RUNS:
        argv = train_argv(run, args, out, pretrained) + common + extra
        weights_dir = train_once(f"run {run.name}", argv)
        epochs = train.get_args_parser().parse_args(argv).epochs
        results.append(read_result(run, weights_dir, epochs))

    from visualize import plot_curves, save_figure

    curves = {f"run {r.run.name}: {'pretrained' if r.run.pretrained else 'scratch'}, "
              f"{r.run.trained_part}": r.curve for r in results}
    references = None if args.quick else {
        name: r.run.report_acc for name, r in zip(curves, results, strict=True)}
    title = "Quick mode (synthetic data, not comparable)" if args.quick else "flower_photos"
    save_figure(plot_curves(curves, references, title=title), out / "val_acc.png")
    text = results_markdown(results, args, pretrained, command)
    atomic_write_text(out / "results.md", text)
    print(f"\n{text}\nWrote {out / 'results.md'} and {out / 'val_acc.png'}.")
    return 0


def run(args: argparse.Namespace, extra: list[str], command: str) -> int:
    """run_all; Ctrl-C, in a run or between runs, or SIGTERM in a run, says how to go on and
    exits 130 (143 for SIGTERM)."""
    try:
        return run_all(args, extra, command)
    except (KeyboardInterrupt, RunStopped) as stop:
        # The finished runs are skipped and the interrupted one resumes (--resume auto).
        print("\nInterrupted; run the same reproduce.py command again to resume.",
              file=sys.stderr)
        return stop.status if isinstance(stop, RunStopped) else INTERRUPTED_STATUS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, extra = split_argv(argv)
    args = get_args_parser().parse_args(ours)
    command = "python reproduce.py " + " ".join(argv)
    return run_main(lambda parsed: run(parsed, extra, command.strip()), args)


if __name__ == "__main__":
    raise SystemExit(main())
