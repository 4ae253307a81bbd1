"""Read ViT weights from a file and fit them to a model.

Every loader here reads data, never code: ``torch.load(weights_only=True)``.
A file this module cannot read, or that does not fit the model, raises
WeightsError with one sentence a user can act on.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the state dict.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "model_ema", "net")


class WeightsError(Exception):
    """A weights file that cannot be read or does not fit the model."""


@dataclass
class Weights:
    """A state dict in this project's names, and what the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str
    # Constructor arguments the file states (all of them for this project's
    # checkpoints; e.g. layer_norm_eps for Hugging Face); empty when it says none.
    model_args: dict = field(default_factory=dict)
    model_name: str | None = None
    class_names: list[str] | None = None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file, in this project's parameter names."""
    return read_weights(path).state_dict


def read_weights(path: str | Path) -> Weights:
    """Read a weights file of any supported format (see the README's table)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist.")
    if path.stat().st_size == 0:
        raise WeightsError(f"Weights file {path} is empty; download it again.")
    obj = _torch_load(path)
    return _from_torch_object(obj, path)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"{path} holds Python objects other than tensors, which could run code when "
            f"loaded; refusing to unpickle it ({str(err).splitlines()[0][:120]}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise WeightsError(f"{path} is not a readable PyTorch weights file (truncated or "
                           f"corrupt? {type(err).__name__}); download it again.") from None


def _from_torch_object(obj: object, path: Path) -> Weights:
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    if "model" in obj and "model_args" in obj:  # a checkpoint written by train.py
        return Weights(state_dict=_strip_prefixes(obj["model"]), format="this project",
                       model_args=dict(obj["model_args"]), model_name=obj.get("model_name"),
                       class_names=obj.get("class_names"))
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state_dict = _strip_prefixes(obj)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path} is a dict but not a state dict of tensors.")
    return Weights(state_dict=state_dict, format="timm / reproduced repository")


def _strip_prefixes(state_dict: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def describe_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the ViT a state dict looks like, e.g. 'ViT-B/32 at 224 px, 21843 classes'."""
    try:
        width, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
    except KeyError:
        return "not a ViT in this project's names"
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    size = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H"}.get(width, f"width {width}")
    tokens = state_dict["pos_embed"].shape[1] - 1 if "pos_embed" in state_dict else 0
    side = int(round(tokens ** 0.5)) * patch
    head = state_dict.get("head.weight")
    classes = f", {head.shape[0]} classes" if head is not None else ""
    logits = ", pre-logits" if "pre_logits.fc.weight" in state_dict else ""
    return f"ViT-{size}/{patch} ({depth} blocks) at {side} px{classes}{logits}"


@dataclass
class LoadReport:
    loaded: int
    left_out: list[str]
    reason: str

    def __str__(self) -> str:
        if not self.left_out:
            return f"Loaded all {self.loaded} tensors."
        return f"Loaded {self.loaded} tensors; left out {', '.join(self.left_out)} ({self.reason})."


def fit_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Drop what fine-tuning replaces (head, pre-logits) and check that the rest fits exactly.

    The head goes when its shape differs from the model's or it is all zeros
    (Google zeroed the ImageNet-21k head); pre-logits go when the model has
    none. Any other difference raises WeightsError naming the keys.
    """
    target = model.state_dict()
    state_dict = dict(state_dict)
    left_out, reasons = [], []

    if not any(k.startswith("pre_logits.") for k in target):
        dropped = [k for k in state_dict if k.startswith("pre_logits.")]
        if dropped:
            left_out += dropped
            reasons.append("the model has no pre-logits layer")
    head_keys = [k for k in state_dict if k.startswith("head.")]
    head_fits = all(k in target and target[k].shape == state_dict[k].shape for k in head_keys)
    head_is_zero = bool(head_keys) and all(not state_dict[k].any() for k in head_keys)
    if head_keys and (not head_fits or head_is_zero):
        left_out += head_keys
        classes = target["head.weight"].shape[0] if "head.weight" in target else 0
        reasons.append(f"a new {classes}-class head is trained" if not head_fits
                       else "its head is all zeros, so a new one is trained")
    for key in left_out:
        state_dict.pop(key)

    problems = []
    # The model keeps its freshly initialised head when the file has none to give.
    missing = [k for k in target if k not in state_dict and not k.startswith("head.")]
    unexpected = [k for k in state_dict if k not in target]
    wrong_shape = [k for k in state_dict if k in target and state_dict[k].shape != target[k].shape]
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if wrong_shape:
        key = wrong_shape[0]
        problems.append(f"{key} is {tuple(state_dict[key].shape)} in the file but "
                        f"{tuple(target[key].shape)} in the model")
    if problems:
        raise WeightsError(f"The weights do not fit the model: {'; '.join(problems)}. The file "
                           f"looks like {describe_architecture(state_dict)}; the model is "
                           f"{describe_architecture(target)}.")
    loaded = len(state_dict)
    return state_dict, LoadReport(loaded=loaded, left_out=left_out, reason="; ".join(reasons))


def _first(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a weights file of any format into a model built for fine-tuning."""
    weights = read_weights(path)
    state_dict, report = fit_state_dict(model, weights.state_dict)
    model.load_state_dict(state_dict, strict=False)
    return report
