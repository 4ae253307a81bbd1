"""What the model sees, as numbers and pictures: attention rollout, confusion matrix, plots.

Attention rollout follows Abnar & Zuidema, "Quantifying Attention Flow in
Transformers", ACL 2020 (arXiv:2005.00928), Eq. for "rollout": per layer the
attention averaged over heads, plus the identity for the residual connection,
rows renormalised; then the product over the layers.

The plot functions return a `matplotlib.figure.Figure` built without pyplot:
no backend is chosen, nothing global is touched, and nothing needs closing, so
train.py can hand them to TensorBoard's `add_figure` every epoch and scripts can
`savefig` them on a machine without a display. `show()` puts them in a window.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import atomic_write_bytes
from errors import writing

if TYPE_CHECKING:  # matplotlib is imported where it is used; only the type is needed here
    from matplotlib.figure import Figure

# --------------------------------------------------------------------------- attention


def _head_mean(attn: torch.Tensor) -> torch.Tensor:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"Expected attention of shape (B, heads, T, T), got {tuple(attn.shape)}.")
    return attn.float().mean(dim=1)  # (B, T, T)


def rollout_matrix(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over all layers, (B, T, T): row i says how much of token i at the
    output comes from each input token, following attention and the residual stream.

    Args:
        maps: per layer, first layer first, attention weights (B, heads, T, T) with rows
            summing to 1, as VisionTransformer.attention_maps returns them.
    """
    if not maps:
        raise ValueError("No attention maps given.")
    rollout = None
    for attn in maps:
        a = _head_mean(attn)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        # Layer l mixes the tokens that layer l - 1 produced, so it multiplies from the left.
        rollout = a if rollout is None else a @ rollout
    return rollout


def _patch_grid(row: torch.Tensor) -> torch.Tensor:
    """(B, N) patch values -> (B, side, side); ViT's patch grid is square."""
    side = math.isqrt(row.shape[-1])
    if side * side != row.shape[-1]:
        raise ValueError(f"{row.shape[-1]} patch tokens do not form a square grid.")
    return row.reshape(row.shape[0], side, side)  # row-major, as PatchEmbed flattens


def attention_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class token's row of the rollout over the patch tokens, as a (B, side, side) grid.

    Values are the raw rollout weights (the class token's own share is left out, so a row
    sums to less than 1); scale them for display.
    """
    return _patch_grid(rollout_matrix(maps)[:, 0, 1:])


def last_layer_attention(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """What the class token attends to in the last block, mean over heads: (B, side, side)."""
    return _patch_grid(_head_mean(maps[-1])[:, 0, 1:])


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear, so a patch map lies over the image it came from."""
    return F.interpolate(grid.unsqueeze(1).float(), size=size, mode="bilinear",
                         align_corners=False).squeeze(1)


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """To [0, 1] for a colour map; a constant map becomes all zeros instead of NaN."""
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


# --------------------------------------------------------------------------- metrics


def confusion_matrix(preds: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
                     num_classes: int) -> torch.Tensor:
    """cm[true, predicted] = count, an int64 (num_classes, num_classes) tensor."""
    preds = torch.as_tensor(preds, dtype=torch.long).flatten().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.numel()} predictions but {labels.numel()} labels.")
    if preds.numel() and (min(preds.min(), labels.min()) < 0
                          or max(preds.max(), labels.max()) >= num_classes):
        raise ValueError(f"A class index is outside 0..{num_classes - 1}.")
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2)
    return flat.reshape(num_classes, num_classes)


def misclassified_indices(probs: torch.Tensor, labels: torch.Tensor | Sequence[int]
                          ) -> list[int]:
    """Indices of the wrong predictions, the most confident first (ties: in input order)."""
    confidence, preds = probs.max(dim=1)
    wrong = (preds != torch.as_tensor(labels)).nonzero().flatten().tolist()
    return sorted(wrong, key=lambda i: -confidence[i].item())


def per_class_metrics(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    A class never predicted has precision 0, a class absent from the labels recall 0
    (scikit-learn's zero_division=0), so the averages stay defined.
    """
    cm = cm.double()
    true_pos = cm.diag()
    predicted = cm.sum(dim=0)
    support = cm.sum(dim=1)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long()}


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure drawn at its own dpi, as (H, W, 3) uint8 pixels (TensorBoard's add_image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save fig in the format path's suffix names, atomically: a failed write leaves the file
    that was there. Drawn in memory first, where matplotlib takes the format from us, not
    from the temporary file's name."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.removeprefix(".").lower() or None, dpi=dpi)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def show(fig: Figure) -> None:
    """Open a window with a figure made without pyplot."""
    import matplotlib.pyplot as plt
    manager = plt.figure().canvas.manager  # a window pyplot manages; give it our figure
    manager.canvas.figure = fig
    fig.set_canvas(manager.canvas)
    plt.show()


def plot_confusion_matrix(cm: torch.Tensor, class_names: Sequence[str],
                          title: str = "Confusion matrix") -> Figure:
    """Counts in each cell, colour by the share of the true class (rows), so small classes
    are as readable as large ones."""
    cm = torch.as_tensor(cm).cpu()
    n = len(class_names)
    shares = cm.double() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    side = 2.0 + 0.6 * n
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    accuracy = cm.diag().sum().item() / max(cm.sum().item(), 1)
    ax.set_title(f"{title} (accuracy {accuracy:.3f})")
    return fig


def plot_class_distribution(class_names: Sequence[str], train_counts: Sequence[int],
                            val_counts: Sequence[int], title: str = "class distribution"
                            ) -> Figure:
    """The reproduced repository's bar chart of images per class, split into train and val."""
    fig = _figure(1.5 + 1.0 * len(class_names), 4.0)
    ax = fig.add_subplot()
    x = range(len(class_names))
    ax.bar(x, train_counts, label="train", color="tab:blue")
    ax.bar(x, val_counts, bottom=train_counts, label="validation", color="tab:orange")
    for i, (t, v) in enumerate(zip(train_counts, val_counts, strict=True)):
        ax.text(i, t + v, str(t + v), ha="center", va="bottom")  # the total, as the repo shows
    ax.set_xticks(list(x), class_names)
    ax.set_ylabel("number of images")
    ax.set_ylim(0, max(t + v for t, v in zip(train_counts, val_counts, strict=True)) * 1.15 + 1)
    ax.set_title(title)
    ax.legend()
    return fig


def plot_prediction_grid(images: Sequence, titles: Sequence[str],
                         colours: Sequence[str] | None = None, columns: int = 4,
                         cell: float = 2.4) -> Figure:
    """Images (PIL or HxWx3 arrays) in a grid, each with its title; cell is inches a side."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig = _figure(cell * columns, (cell + 0.2) * rows)
    for i, (image, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image)
        ax.set_title(title, fontsize=9, color=colours[i] if colours else "black")
        ax.axis("off")
    return fig


def plot_attention(image: torch.Tensor, rollout: torch.Tensor, last: torch.Tensor,
                   title: str = "") -> Figure:
    """The image the model saw beside its attention rollout and the last block's attention.

    Args:
        image: (3, H, W) in [0, 1], the crop that went into the model.
        rollout: (h, w) attention_rollout for this image.
        last: (h, w) last_layer_attention for this image.
    """
    size = tuple(image.shape[-2:])
    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
    fig = _figure(9.0, 3.4)
    panels = [(None, "input"), (rollout, "attention rollout"), (last, "last block, class token")]
    for i, (grid, name) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(picture)
        if grid is not None:
            heat = _scaled(upsample(grid[None], size)[0])
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(curves: dict[str, dict[int, float]], references: dict[str, float] | None = None,
                ylabel: str = "validation accuracy", title: str = "") -> Figure:
    """One line per curve ({epoch: value}, epochs from 1), dashed horizontal references."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    colours = {}
    for name, points in curves.items():
        epochs = sorted(points)
        (line,) = ax.plot(epochs, [points[e] for e in epochs], marker="o", markersize=3,
                          label=name)
        colours[name] = line.get_color()
    for name, value in (references or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color=colours.get(name, "gray"),
                   label=f"{name}: report {value:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig
