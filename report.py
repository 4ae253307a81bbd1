"""One page that explains a model: the HTML report of ``evaluate.py --html``.

The page stands alone: every picture is a PNG inside it (a base64 data URI), the styling is
one <style> block, and nothing is fetched or scripted, so it opens offline, mails as one file
and prints to PDF. It shows the run's facts, the accuracy and per-class table (the numbers of
metrics.json), the confusion matrix, the validation curves when the checkpoint's run is
known, and a gallery: every misclassified image (the most confident first, up to
MAX_MISTAKES) and a few correct ones per class, each with its attention rollout and the
Grad-CAM map of the predicted class.
"""

from __future__ import annotations

import base64
import html
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints import Checkpoint, atomic_write_text, epoch_checkpoints, peek_checkpoint
from errors import writing
from grad_cam import overlay_on_crop
from predict import attention_grids, grad_cam_maps, grad_cam_title, top_classes
from visualize import misclassified_indices, plot_confusion_matrix, plot_curves
from vit_model import VisionTransformer

MAX_MISTAKES = 60      # cards of misclassified images; misclassified.csv lists every one
CORRECT_PER_CLASS = 3  # cards of correctly classified images per class
TOP_K = 3              # probabilities on a card
THUMB = 160            # pixels a side of a card's pictures
HTML_SUFFIXES = (".html", ".htm")


@dataclass
class Card:
    """One image of the gallery."""

    path: Path
    true: str
    predicted: str
    top: list[tuple[str, float]]
    pictures: list[tuple[str, str]]  # (caption, PNG data URI): input, rollout, Grad-CAM


# --------------------------------------------------------------------------- pictures


def png_data_uri(picture) -> str:
    """A matplotlib Figure, an (H, W, 3) uint8 array or a PIL image as a PNG data URI."""
    from PIL import Image

    buffer = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buffer, format="png", dpi=100)
    else:
        image = Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture
        image.save(buffer, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(picture: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(picture).resize((THUMB, THUMB), Image.Resampling.BICUBIC)
    return png_data_uri(image)


def gallery_indices(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """(every misclassified image, the most confident first; the first CORRECT_PER_CLASS
    correct images of each class, in class order)."""
    right = (probs.argmax(dim=1) == labels).tolist()
    label_list = labels.tolist()
    correct: list[int] = []
    for label in sorted(set(label_list)):
        hits = [i for i, (y, ok) in enumerate(zip(label_list, right, strict=True))
                if ok and y == label]
        correct += hits[:CORRECT_PER_CLASS]
    return misclassified_indices(probs, labels), correct


def build_cards(model: VisionTransformer, indices: list[int], paths: list[Path],
                labels: torch.Tensor, probs: torch.Tensor, class_names: list[str],
                device: torch.device, batch_size: int = 32) -> list[Card]:
    """A card per index, its maps computed for those images only."""
    chosen = [paths[i] for i in indices]
    preds = probs.argmax(dim=1)
    targets = [int(preds[i]) for i in indices]
    rollouts = attention_grids(model, chosen, device, batch_size, workers=0)
    cams = grad_cam_maps(model, chosen, device, targets, batch_size=batch_size, workers=0)
    cards = []
    for i, (crop, rollout, _), (_, cam) in zip(indices, rollouts, cams, strict=True):
        picture = np.uint8(255 * crop.permute(1, 2, 0).clamp(0, 1).numpy() + 0.5)
        predicted = class_names[preds[i]]
        cards.append(Card(paths[i], class_names[labels[i]], predicted,
                          top_classes(probs[i], class_names, TOP_K),
                          [("input", _thumbnail(picture)),
                           ("attention rollout", _thumbnail(overlay_on_crop(crop, rollout))),
                           (grad_cam_title(predicted, cam),
                            _thumbnail(overlay_on_crop(crop, cam)))]))
    return cards


# --------------------------------------------------------------------------- the run


def validation_curves(weights_path: Path, checkpoint: Checkpoint | None
                      ) -> dict[str, dict[str, dict[int, float]]] | None:
    """{"accuracy": {"train": {epoch: v}, "validation": ...}, "loss": ...} from the epoch
    checkpoints of the same run beside the weights file; None when the run is unknown.
    checkpoint is that file's (None for a Hugging Face folder or a bare state dict)."""
    if checkpoint is None or checkpoint.epoch is None:
        return None
    curves: dict[str, dict[str, dict[int, float]]] = {"accuracy": {}, "loss": {}}
    for epoch, path in epoch_checkpoints(weights_path.parent):
        other = peek_checkpoint(path)
        if other is None or not other.metrics or not same_run(other, checkpoint):
            continue  # another run's file in the same folder
        for kind, key in (("accuracy", "acc"), ("loss", "loss")):
            for split in ("train", "val"):
                value = other.metrics.get(f"{split}_{key}")
                if value is not None:
                    name = "validation" if split == "val" else "train"
                    curves[kind].setdefault(name, {})[epoch + 1] = value
    return curves if curves["accuracy"] else None


def same_run(one: Checkpoint, other: Checkpoint) -> bool:
    """Whether two checkpoints are epochs of one run: their TensorBoard folders share the
    name the run started with (a run resumed with another --log-dir keeps that name)."""
    return (one.log_dir is None) == (other.log_dir is None) and (
        one.log_dir is None or Path(one.log_dir).name == Path(other.log_dir).name)


def run_facts(summary: dict, checkpoint: Checkpoint | None, model: VisionTransformer,
              model_name: str) -> list[tuple[str, str]]:
    """(label, value) rows: what was evaluated, on what, and how it was trained."""
    name = checkpoint.model_name if checkpoint is not None and checkpoint.model_name else model_name
    params = sum(p.numel() for p in model.parameters())
    facts = [("checkpoint", summary["weights"]),
             ("model", f"{name} ({params:,} parameters, {model.image_size} px input)"),
             ("data folder", summary["data_path"]),
             ("images", f"{summary['num_images']} ({summary['subset']})"),
             ("split", f"seed {summary['seed']}, validation rate {summary['val_rate']}")]
    if checkpoint is not None and checkpoint.epoch is not None:
        planned = checkpoint.args.get("epochs")
        # best.pth is the best epoch's checkpoint, not the last one: say which epoch it holds
        facts.append(("weights from epoch", f"{checkpoint.epoch + 1}"
                      + (f" of {planned}" if planned else "")))
    if checkpoint is not None and checkpoint.best_acc is not None:
        facts.append(("best validation accuracy in training", f"{checkpoint.best_acc:.4f}"))
    return facts


# --------------------------------------------------------------------------- the page

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .8rem; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.avg td { color: #555; font-style: italic; }
.accuracy { font-size: 1.3rem; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr));
           gap: 1rem; align-items: start; }
.figures img { width: 100%; height: auto; }
.summary { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.2fr); gap: 1.5rem;
           align-items: start; }
.summary figure { margin: 0; }
.summary img { width: 100%; max-width: 560px; height: auto; }
@media (max-width: 820px) { .summary { grid-template-columns: 1fr; } }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
         gap: .8rem; }
.card { border: 1px solid #ddd; border-left: 5px solid #2a8a2a; border-radius: 4px;
        padding: .5rem .6rem; break-inside: avoid; page-break-inside: avoid; }
.card.wrong { border-left-color: #c62828; }
.card .path { font-size: .8rem; color: #555; overflow-wrap: anywhere; margin: 0; }
.card .verdict { margin: .2rem 0; }
.card ol { margin: .2rem 0 .4rem; padding-left: 1.4rem; font-size: .85rem; }
.maps { display: grid; grid-template-columns: repeat(3, 1fr); gap: .3rem; margin: 0; }
.maps figure { margin: 0; }
.maps img { width: 100%; height: auto; display: block; }
.maps figcaption { font-size: .72rem; color: #555; text-align: center; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  .figures, .summary, .card, table { break-inside: avoid; page-break-inside: avoid; }
  .cards { grid-template-columns: repeat(2, 1fr); }
}
"""


def _facts_html(facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    return f'<dl class="facts">{rows}</dl>'


def _table_html(metrics: dict) -> str:
    def row(name: str, values: dict, support: int, css: str = "") -> str:
        cells = "".join(f"<td>{values[m]:.4f}</td>" for m in ("precision", "recall", "f1"))
        return f'<tr class="{css}"><td>{html.escape(name)}</td>{cells}<td>{support}</td></tr>'

    rows = [row(name, values, values["support"]) for name, values in metrics["classes"].items()]
    rows += [row(label, metrics[key], metrics["num_images"], "avg")
             for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg"))]
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    return f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _card_html(card: Card, wrong: bool) -> str:
    verdict = (f"true <b>{html.escape(card.true)}</b>, predicted "
               f"<b>{html.escape(card.predicted)}</b>")
    top = "".join(f"<li>{html.escape(name)}: {prob:.3f}</li>" for name, prob in card.top)
    maps = "".join(f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                   for caption, uri in card.pictures)
    return (f'<article class="card{" wrong" if wrong else ""}">'
            f'<p class="path">{html.escape(str(card.path))}</p>'
            f'<p class="verdict">{verdict}</p><ol>{top}</ol>'
            f'<div class="maps">{maps}</div></article>')


def _gallery_html(mistakes: list[Card], correct: list[Card], total_mistakes: int) -> str:
    if not mistakes:
        intro = "<p>No image is misclassified.</p>"
    elif total_mistakes > len(mistakes):
        intro = (f"<p>The {len(mistakes)} most confident of {total_mistakes} mistakes; "
                 f"misclassified.csv lists every one.</p>")
    elif total_mistakes == 1:
        intro = "<p>The one misclassified image.</p>"
    else:
        intro = (f"<p>All {total_mistakes} misclassified images, the most confident "
                 f"mistake first.</p>")
    intro += ("<p>Each card: the crop the model saw, its attention rollout (Abnar &amp; "
              "Zuidema 2020) and the Grad-CAM map of the predicted class (Selvaraju et al. "
              "2017).</p>")
    wrong = "".join(_card_html(card, True) for card in mistakes)
    right = "".join(_card_html(card, False) for card in correct)
    return (f'<h2 id="mistakes">Misclassified images</h2>{intro}<div class="cards">{wrong}</div>'
            f'<h2 id="correct">Correctly classified, up to {CORRECT_PER_CLASS} per class</h2>'
            f"<p>For comparison: where the model looks when it is right.</p>"
            f'<div class="cards">{right}</div>')


def render_page(facts: list[tuple[str, str]], metrics: dict, confusion_uri: str,
                curve_uris: list[str] | None, gallery: str) -> str:
    """The whole page; every string from outside is escaped where it is put in."""
    title = f"Evaluation of {Path(metrics['weights']).name}"
    confusion = f'<figure><img src="{confusion_uri}" alt="confusion matrix"></figure>'
    if curve_uris:
        curves = "".join(f'<figure><img src="{uri}" alt="training curve"></figure>'
                         for uri in curve_uris)
        curves = f'<div class="figures">{curves}</div>'
    else:
        curves = ("<p>The run that made this checkpoint is unknown (no epoch checkpoints "
                  "of it beside the weights), so there are no curves.</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{_facts_html(facts)}"
            f'<h2 id="metrics">Accuracy, per-class metrics, confusion matrix</h2>'
            f'<div class="summary"><div><p class="accuracy">accuracy '
            f'<b>{metrics["accuracy"]:.4f}</b> ({metrics["correct"]} of '
            f'{metrics["num_images"]} images)</p>{_table_html(metrics)}</div>{confusion}</div>'
            f'<h2 id="curves">Training curves</h2>{curves}{gallery}</body></html>\n')


def write_html_report(path: Path, summary: dict, weights_path: Path, model: VisionTransformer,
                      model_name: str, paths: list[Path], labels: torch.Tensor,
                      probs: torch.Tensor, device: torch.device, batch_size: int = 32) -> Path:
    """The page for evaluate.py's results; summary is what it writes to metrics.json."""
    class_names = summary["class_names"]
    checkpoint = peek_checkpoint(weights_path) if weights_path.is_file() else None
    confusion = plot_confusion_matrix(torch.tensor(summary["confusion_matrix"]), class_names,
                                      f"Confusion matrix, {summary['subset']} images")
    curves = validation_curves(weights_path, checkpoint)
    curve_uris = None if curves is None else [
        png_data_uri(plot_curves(curves[kind], ylabel=kind, title=f"{kind} per epoch"))
        for kind in ("accuracy", "loss")]
    mistakes, correct = gallery_indices(probs, labels)
    shown = mistakes[:MAX_MISTAKES]
    cards = build_cards(model, shown + correct, paths, labels, probs, class_names, device,
                        batch_size)
    gallery = _gallery_html(cards[:len(shown)], cards[len(shown):], len(mistakes))
    page = render_page(run_facts(summary, checkpoint, model, model_name), summary,
                       png_data_uri(confusion), curve_uris, gallery)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path


if __name__ == "__main__":
    # A module, not a command: say which command writes its page.
    print("error: report.py has no command of its own; the page is written by "
          "python evaluate.py --html report.html", file=sys.stderr)
    raise SystemExit(2)
