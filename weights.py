"""Read ViT weights of every common format and fit them to this project's model.

Supported (the format is detected from the file's content; its suffix only
phrases the error when the content is damaged):

- this project's checkpoints (``{"model", "model_args", ...}``, from train.py
  and convert.py) and plain state dicts in timm / reproduced-repository names
  (``jx_vit_base_patch16_224_in21k-e5005f0a.pth``, with ``pre_logits.fc``),
  also nested under ``model`` / ``state_dict`` and with the ``module.``
  (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefixes;
- timm ``.safetensors`` / ``.pth`` of today (same names, no pre-logits);
- Google's original ``.npz`` (``ViT-B_16.npz``, AugReg files; ``opt/target/``
  prefix accepted);
- Hugging Face ``ViTModel`` / ``ViTForImageClassification``: the folder
  ``save_pretrained`` writes, or its ``model.safetensors`` / ``pytorch_model.bin``
  with ``config.json`` beside it;
- torchvision ``vit_b_16`` & co. state dicts (also the older ``mlp.linear_1`` names).

Every loader reads data, never code: ``torch.load(weights_only=True)``,
``numpy.load(allow_pickle=False)`` and the small safetensors reader below (the
``safetensors`` package is not needed at run time). A file this module cannot
read, or that does not fit the model, raises WeightsError with a sentence a
user can act on.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import (
    BEST_FILE,
    EPOCH_FILES,
    INTERRUPTED_FILE,
    UNREADABLE_TORCH_FILE,
    Checkpoint,
    epoch_checkpoints,
    is_project_checkpoint,
    is_torchscript,
    zip_member_names,
)
from errors import UserError, WeightsError
from vit_model import MODEL_ARG_NAMES, VisionTransformer, create_model, list_models

# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the state dict, in order of preference.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "model_ema", "state_dict_ema",
                "module", "net")
# Hugging Face's ViTConfig default; every google/vit-* config states it too.
_HF_LAYER_NORM_EPS = 1e-12


@dataclass
class Weights:
    """A state dict in this project's names, and what the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    # The detected format in words: "Google .npz", "timm safetensors", "torchvision", ...
    format: str
    # Constructor arguments of VisionTransformer the file states: all of them for this
    # project's checkpoints; for Hugging Face those of config.json; num_heads for Google
    # .npz (its kernels are per head); empty when the file says nothing beyond the tensor
    # shapes. build_model_for decides which of them a model for the file takes.
    model_args: dict = field(default_factory=dict)
    model_name: str | None = None
    class_names: list[str] | None = None

    @property
    def complete_args(self) -> bool:
        """Whether model_args name every VisionTransformer argument, so they alone rebuild
        the model the file was saved from (this project's checkpoints)."""
        return set(MODEL_ARG_NAMES) <= set(self.model_args)


def read_weights(path: str | Path) -> Weights:
    """Read a weights file or Hugging Face folder of any supported format.

    The state dict comes back in this project's names, with what the file states
    about the model (``Weights.model_args``); build_model_for builds the model for it.
    """
    path = Path(path)
    if path.is_dir():
        return _read_hugging_face_folder(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist.")
    if path.stat().st_size == 0:
        raise WeightsError(f"Weights file {path} is empty; {_what_to_do_instead(path)}.")
    try:
        container = _sniff(path)
    except OSError as err:  # permissions, or a file that vanished or is a FIFO gone wrong
        raise WeightsError(f"Weights file {path} cannot be read ({err.strerror or err}).") from None
    if container == "npz":
        tensors = _read_npz(path)
    elif container == "safetensors":
        tensors = read_safetensors(path)
    else:
        obj = _torch_load(path)
        if is_project_checkpoint(obj):  # written by train.py or convert.py
            checkpoint = Checkpoint.from_dict(obj)
            return Weights(state_dict=_strip_prefixes(checkpoint.model), format="this project",
                           model_args=_checked_model_args(checkpoint.model_args, path),
                           model_name=checkpoint.model_name, class_names=checkpoint.class_names)
        tensors = _unwrap(obj, path)
    return _to_project_names(tensors, path, container)


def _checked_model_args(model_args: object, path: Path) -> dict:
    """A checkpoint's model_args, if they are VisionTransformer's arguments by name."""
    if isinstance(model_args, dict):
        unknown = sorted(str(k) for k in model_args if k not in MODEL_ARG_NAMES)
        if not unknown:
            return dict(model_args)
        what = f"names {_first(unknown)}, which are not arguments of the model"
    else:
        what = f"is a {type(model_args).__name__}, not a dict of the model's arguments"
    raise WeightsError(f"{path} is a checkpoint whose model_args {what}; it was changed after "
                       f"it was written. Use the file it was copied from, or train again.")


# --------------------------------------------------------------------------- file containers

def _sniff(path: Path) -> str:
    """'npz', 'safetensors' or 'torch', from the first bytes (and the zip's member names)."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):  # a zip archive: numpy's .npz or PyTorch's format since 1.6
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise _damaged(path, "zip archive (a .pth or .npz)") from None
        if _are_arrays(names):
            return "npz"
        if is_torchscript(names):
            raise WeightsError(f"{path} is a TorchScript export of a model, which the commands "
                               f"do not read as weights; pass the checkpoint (.pth) it was "
                               f"exported from.")
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle: PyTorch's format before 1.6
        return "torch"
    kinds = {".npz": "numpy .npz", ".safetensors": "safetensors", ".pth": "PyTorch",
             ".pt": "PyTorch", ".bin": "PyTorch", ".ckpt": "PyTorch"}
    if path.suffix in kinds:
        raise _damaged(path, f"{kinds[path.suffix]} file")
    raise WeightsError(f"{path} is not a weights file this program reads (PyTorch .pth/.bin, "
                       f".safetensors, Google .npz, or a Hugging Face folder).")


def _are_arrays(names: list[str]) -> bool:
    """Whether a zip's member names are numpy.savez's: one .npy file per array."""
    return bool(names) and all(name.endswith(".npy") for name in names)


def is_npz_file(path: str | Path) -> bool:
    """Whether path is a numpy .npz archive, the container of Google's weights."""
    return _are_arrays(zip_member_names(path))


def _damaged(path: Path, what: str, detail: str = "") -> WeightsError:
    detail = f" ({detail})" if detail else ""
    return WeightsError(f"{path} is not a readable {what}{detail}: it is truncated or corrupt; "
                        f"{_what_to_do_instead(path)}.")


def _what_to_do_instead(path: Path) -> str:
    """The way on from a damaged or empty weights file. A checkpoint a training run wrote
    cannot be downloaded again, but the run's other checkpoints stand in for it, and
    --resume auto rebuilds best.pth from them (train.py's restore_best)."""
    folder = path.parent
    if path.name == BEST_FILE:
        return (f"pass one of the run's {EPOCH_FILES} in {folder} instead, or rebuild it by "
                f"running the run's train.py command again with --resume auto --output-dir "
                f"{folder}")
    if path.name == INTERRUPTED_FILE or path in (p for _, p in epoch_checkpoints(folder)):
        return (f"pass another of the run's checkpoints in {folder} instead ({BEST_FILE} or "
                f"another {EPOCH_FILES})")
    return "download it again"


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # torch warns about unusual pickle protocols before it fails on them.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if culprit is None:
            raise _damaged(path, "PyTorch file", "not a pickle of tensors") from None
        raise WeightsError(
            f"{path} holds a Python object ({culprit.group(1)}) besides tensors, and "
            f"unpickling it could run code; refusing to load it. If you trust the file, load "
            f"it yourself and save only the state dict.") from None
    except UNREADABLE_TORCH_FILE as err:
        raise _damaged(path, "PyTorch file", type(err).__name__) from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    # The format's 8-bit floats, where this torch has them.
    **{code: getattr(torch, name) for code, name in (("F8_E4M3", "float8_e4m3fn"),
                                                      ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, name)},
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file without the safetensors package.

    The format: an unsigned 64-bit little-endian header length n, n bytes of
    JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
    {...}}``, then the raw little-endian tensor bytes, offsets relative to the
    end of the header.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise _damaged(path, "safetensors file", "the header length exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _damaged(path, "safetensors file", "its header is not JSON") from None
        if not isinstance(header, dict):
            raise _damaged(path, "safetensors file", "its header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        tensors = {}
        for name, info in header.items():
            dtype, shape, begin, nbytes = _safetensors_entry(path, name, info)
            if data_start + begin + nbytes > size:
                raise _damaged(path, "safetensors file", f"the data of {name} is missing")
            # One buffer per tensor: aligned for its dtype, and freed with it.
            buffer = bytearray(nbytes)
            f.seek(data_start + begin)
            if f.readinto(buffer) != nbytes:
                raise _damaged(path, "safetensors file", f"the data of {name} is missing")
            tensors[name] = (torch.frombuffer(buffer, dtype=dtype).reshape(shape) if nbytes
                             else torch.empty(shape, dtype=dtype))
    return tensors


def _safetensors_entry(path: Path, name: str, info: object
                       ) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, nbytes) of one header entry, once they agree with each other."""
    try:
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        raise _damaged(path, "safetensors file", f"bad header entry {name}") from None
    numbers = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else []
    if not numbers or len(offsets) != 2 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise _damaged(path, "safetensors file", f"tensor {name} has shape {shape} and offsets "
                                                 f"{offsets}, not counts of 0 or more")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise WeightsError(f"{path}: tensor {name} has dtype {dtype_name}, which this reader "
                           f"does not support.")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes:
        raise _damaged(path, "safetensors file", f"tensor {name} is {dtype_name} {shape}, "
                                                 f"{nbytes} bytes, but its offsets span "
                                                 f"{end - begin}")
    return dtype, shape, begin, nbytes


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise WeightsError(f"{path} holds pickled Python objects besides arrays, and "
                               f"unpickling them could run code; refusing to load it.") from None
        raise _damaged(path, "numpy .npz file", str(err)[:80]) from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise _damaged(path, "numpy .npz file", type(err).__name__) from None
    tensors = {}
    for key, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise WeightsError(f"{path}: {key} is a {array.dtype} array, not numbers; this is "
                               f"not a ViT weights file.")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array, array.dtype.newbyteorder("=")))
    return tensors


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training script's checkpoint, without wrapper prefixes."""
    for _ in range(3):  # e.g. {"state_dict": {"model": {...}}}
        if not isinstance(obj, dict):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    state_dict = _strip_prefixes(obj)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path} is a dict but not a state dict of tensors (keys: "
                           f"{_first([str(k) for k in obj])}).")
    return state_dict


def _strip_prefixes(state_dict: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):  # in any order: DDP around compile or back
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# --------------------------------------------------------------------------- naming schemes

def _to_project_names(tensors: dict[str, torch.Tensor], path: Path, container: str) -> Weights:
    """Recognise the naming scheme by its keys and rename to this project's."""
    keys = set(tensors)
    if any(k.endswith("embedding/kernel") for k in keys):
        return _from_google(tensors, path)
    if any(k.split("vit.", 1)[-1] == "embeddings.patch_embeddings.projection.weight"
           for k in keys):
        return _from_hugging_face(tensors, path, _hf_config(path.parent), path.name)
    container_word = {"safetensors": " safetensors", "npz": " .npz"}.get(container, "")
    if "conv_proj.weight" in keys or "encoder.pos_embedding" in keys:
        return Weights(state_dict=_rename(tensors, _TORCHVISION_RULES),
                       format=f"torchvision{container_word}")
    if "patch_embed.proj.weight" in keys:
        return Weights(state_dict=tensors,
                       format=f"timm{container_word}" if container_word
                       else "timm / reproduced repository .pth")
    raise WeightsError(f"{path} holds tensors named like {_first(sorted(keys))}, which is no ViT "
                       f"naming this program knows (timm, torchvision, Hugging Face, Google .npz).")


def _rename(tensors: dict[str, torch.Tensor], rules: list[tuple[str, str]]
            ) -> dict[str, torch.Tensor]:
    """Rename keys by the first rule whose pattern matches the whole key; keep the rest.

    Keys no rule knows keep their names, so fit_state_dict names them as unexpected.
    """
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    out = {}
    for key, value in tensors.items():
        for pattern, template in compiled:
            match = pattern.fullmatch(key)
            if match:
                key = match.expand(template)
                break
        out[key] = value
    return _merge_qkv(out)


def _merge_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack separate blocks.i.attn.{q,k,v}.{weight,bias} into blocks.i.attn.qkv ([q; k; v])."""
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(blocks\.\d+\.attn\.)([qkv])\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        stem, _, kind = match.groups()
        parts = [f"{stem}{p}.{kind}" for p in "qkv"]
        if all(p in state_dict for p in parts):
            out[f"{stem}qkv.{kind}"] = torch.cat([state_dict[p] for p in parts], dim=0)
        else:
            out[key] = value  # incomplete: leave it for fit_state_dict to name
    return out


_TV = r"encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_RULES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_TV + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_TV + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (_TV + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_TV + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_TV + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_TV + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.pre_logits\.(weight|bias)", r"pre_logits.fc.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]

# Files on the hub name layers encoder.layer.i.*; transformers 5 renamed its modules
# (layers.i.attention.q_proj, ...) and converts back when saving, but a state_dict()
# saved with torch.save has the new names. Both are accepted.
_HF = r"(?:encoder\.layer|layers)\.(\d+)\."
_HUGGING_FACE_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_HF + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    *[(_HF + rf"attention\.(?:attention\.{long}|{short}_proj)\.(weight|bias)",
       rf"blocks.\1.attn.{short}.\2")
      for long, short in (("query", "q"), ("key", "k"), ("value", "v"))],
    (_HF + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_HF + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_HF + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_HF + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pre_logits.fc.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]


def _read_hugging_face_folder(folder: Path) -> Weights:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_weights(folder / name)
    if any(folder.glob("*.index.json")):
        raise WeightsError(f"{folder} holds a sharded checkpoint, which this program does not "
                           f"read; a ViT fits in one file: save it with a larger max_shard_size.")
    raise WeightsError(f"{folder} is a folder without model.safetensors or pytorch_model.bin; "
                       f"pass a weights file or a Hugging Face model folder.")


def _hf_config(folder: Path) -> dict | None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{config_path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path} is not a JSON object.")
    return config


def _from_hugging_face(tensors: dict[str, torch.Tensor], path: Path, config: dict | None,
                       file_name: str) -> Weights:
    tensors = {key.removeprefix("vit."): value for key, value in tensors.items()
               # The mask token is for masked-image pretraining only.
               if key.removeprefix("vit.") != "embeddings.mask_token"}
    state_dict = _rename(tensors, _HUGGING_FACE_RULES)
    architecture = "ViTForImageClassification" if "head.weight" in state_dict else "ViTModel"
    pre_logits = state_dict.get("pre_logits.fc.weight")
    head = state_dict.get("head.weight")
    # Everything the shapes say, so VisionTransformer(**model_args) rebuilds the model.
    model_args = {"num_classes": head.shape[0] if head is not None else 0,
                  "representation_size": pre_logits.shape[0] if pre_logits is not None else None,
                  "layer_norm_eps": _HF_LAYER_NORM_EPS}
    class_names = None
    if config is None:
        source = f"{file_name}, no config.json: assumed layer_norm_eps {_HF_LAYER_NORM_EPS}"
    else:
        source = file_name
        model_args.update(_hf_model_args(config, path, has_pooler=pre_logits is not None))
        labels = config.get("id2label") or {}
        names = [str(labels.get(str(i), labels.get(i, ""))) for i in range(len(labels))]
        if names and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):
            class_names = names
    return Weights(state_dict=state_dict, format=f"Hugging Face {architecture} ({source})",
                   model_args=model_args, class_names=class_names)


def _hf_model_args(config: dict, path: Path, has_pooler: bool) -> dict:
    """VisionTransformer arguments from a Hugging Face ViTConfig; errors for what it lacks."""
    where = path.parent / "config.json"
    if config.get("model_type", "vit") != "vit":
        raise WeightsError(f"{where} describes a '{config['model_type']}' model, not a plain "
                           f"ViT; its weights would not compute the same function here.")
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"{where} uses the activation '{config['hidden_act']}'; this model "
                           f"has the exact GELU only.")
    if has_pooler and config.get("pooler_act", "tanh") != "tanh":
        raise WeightsError(f"{where} uses pooler_act '{config['pooler_act']}'; this model's "
                           f"pre-logits layer has tanh only.")
    args = {}
    for hf_name, name in (("hidden_size", "embed_dim"), ("num_hidden_layers", "depth"),
                          ("num_attention_heads", "num_heads"), ("image_size", "img_size"),
                          ("patch_size", "patch_size"), ("num_channels", "in_chans"),
                          ("qkv_bias", "qkv_bias"), ("layer_norm_eps", "layer_norm_eps")):
        value = config.get(hf_name)
        if isinstance(value, list | tuple):  # image_size / patch_size may be [h, w]
            if len(set(value)) != 1:
                raise WeightsError(f"{where} has a non-square {hf_name} {value}; this model "
                                   f"takes square images and patches.")
            value = value[0]
        if value is not None:
            args[name] = value
    if "hidden_size" in config and "intermediate_size" in config:
        args["mlp_ratio"] = config["intermediate_size"] / config["hidden_size"]
    return args


# Google's names inside Transformer/encoderblock_i/ -> ours inside blocks.i.
_GOOGLE_BLOCK = {
    "LayerNorm_0": "norm1",
    "MultiHeadDotProductAttention_1/query": "attn.q",
    "MultiHeadDotProductAttention_1/key": "attn.k",
    "MultiHeadDotProductAttention_1/value": "attn.v",
    "MultiHeadDotProductAttention_1/out": "attn.proj",
    "LayerNorm_2": "norm2",
    "MlpBlock_3/Dense_0": "mlp.fc1",
    "MlpBlock_3/Dense_1": "mlp.fc2",
}
_GOOGLE_TOP = {
    "embedding": "patch_embed.proj",
    "Transformer/encoder_norm": "norm",
    "pre_logits": "pre_logits.fc",
    "head": "head",
}


def _from_google(tensors: dict[str, torch.Tensor], path: Path) -> Weights:
    """Google's Flax names and layouts -> ours (the mapping table in docs/DESIGN.md)."""
    prefix = next(k for k in sorted(tensors) if k.endswith("embedding/kernel"))
    prefix = prefix[: -len("embedding/kernel")]
    if f"{prefix}Transformer/encoderblock_0/LayerNorm_0/scale" not in tensors:
        raise WeightsError(f"{path} is an .npz of another layout (no Transformer/encoderblock_0 "
                           f"under '{prefix}'; big_vision files stack the blocks); only the "
                           f"original ViT release layout is supported.")
    # Files with opt/target/ also hold the optimiser's state under opt/state/: skip it.
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state_dict, num_heads = {}, None
    for key, value in tensors.items():
        module, _, leaf = key.rpartition("/")
        block = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", module)
        if key == "cls":
            state_dict["cls_token"] = value
        elif key == "Transformer/posembed_input/pos_embedding":
            state_dict["pos_embed"] = value
        elif block and block.group(2) in _GOOGLE_BLOCK:
            name = f"blocks.{block.group(1)}.{_GOOGLE_BLOCK[block.group(2)]}"
            if name.endswith((".attn.q", ".attn.k", ".attn.v")) and leaf == "kernel":
                num_heads = value.shape[1]  # (D, heads, head_dim)
            state_dict[_torch_name(name, leaf)] = _google_to_torch(value, leaf, name)
        elif module in _GOOGLE_TOP:
            name = _GOOGLE_TOP[module]
            state_dict[_torch_name(name, leaf)] = _google_to_torch(value, leaf, name)
        else:
            state_dict[key] = value  # unknown: fit_state_dict names it
    model_args = {"num_heads": int(num_heads)} if num_heads else {}
    return Weights(state_dict=_merge_qkv(state_dict), format="Google .npz", model_args=model_args)


def _torch_name(name: str, leaf: str) -> str:
    return f"{name}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def _google_to_torch(value: torch.Tensor, leaf: str, name: str) -> torch.Tensor:
    """One Flax array -> PyTorch layout: kernels are (in, out), conv kernels HWIO."""
    if leaf == "bias":
        return value.reshape(-1).contiguous()  # per-head (heads, head_dim) biases flatten
    if leaf != "kernel":
        return value
    if value.ndim == 4:
        return value.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    if name.endswith("attn.proj"):
        value = value.reshape(-1, value.shape[-1])    # (heads, head_dim, D) -> (D, D)
    else:
        value = value.reshape(value.shape[0], -1)     # q/k/v (D, heads, head_dim) -> (D, D)
    return value.t().contiguous()                     # (in, out) -> (out, in)


# --------------------------------------------------------------------------- fitting

def describe_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the ViT a state dict looks like, e.g. 'ViT-B/32 (12 blocks, width 768) at 224 px'."""
    patch_weight = state_dict.get("patch_embed.proj.weight")
    if patch_weight is None or patch_weight.ndim != 4:
        return f"not a ViT in this project's names (keys like {_first(sorted(state_dict), 2)})"
    width, _, patch, _ = patch_weight.shape
    depth = _depth(state_dict)
    size = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H"}.get(width, f"width-{width}")
    text = f"ViT-{size}/{patch} ({depth} blocks, width {width})"
    if "pos_embed" in state_dict:
        text += f" at {_grid_side(state_dict['pos_embed']) * patch} px"
    head = state_dict.get("head.weight")
    text += f", {head.shape[0]} classes" if head is not None else ", no head"
    if "pre_logits.fc.weight" in state_dict:
        text += ", pre-logits"
    return text


def _depth(state_dict: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})


def _grid_side(pos_embed: torch.Tensor) -> int:
    """Patches per side of a (1, 1 + g*g, C) position embedding (the class token first)."""
    return math.isqrt(pos_embed.shape[1] - 1)


def head_is_zero(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the head's weight exists and is all zeros, so its logits ignore the image.

    Google zeroed the head of its ImageNet-21k release (ViT-B_16.npz, and the jx_..._in21k
    .pth converted from it): such weights are for fine-tuning, not for predicting.
    """
    weight = state_dict.get("head.weight")
    return weight is not None and not bool(weight.any())


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1
                       ) -> torch.Tensor:
    """Resize a (1, prefix + g*g, C) position embedding to a new_grid x new_grid grid.

    The class position is kept apart and unchanged; the grid is interpolated in 2-D
    as the paper does for higher resolutions. The choice is timm's when it filters a
    state dict: bicubic, align_corners=False, antialias=True (PyTorch then uses the
    PIL-style cubic, which also low-pass filters when shrinking), computed in float32.
    Other ports differ slightly (docs/DESIGN.md), so fine-tuning is what makes the
    result good, not the choice of filter.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise WeightsError(f"The position embedding has {grid.shape[1]} grid positions, not a "
                           f"square number; cannot resample it.")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, C, H, W)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                         antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)       # (1, H*W, C)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


@dataclass
class LoadReport:
    loaded: int
    left_out: list[str]
    reason: str
    # Changes made to fit, e.g. "resampled the position embedding from 14x14 to 24x24".
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"Loaded {self.loaded} tensors" if self.left_out or self.notes
                 else f"Loaded all {self.loaded} tensors"]
        if self.left_out:
            parts.append(f"left out {', '.join(self.left_out)} ({self.reason})")
        return "; ".join(parts + self.notes) + "."


def fit_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Adapt a state dict in this project's names to a model built for fine-tuning.

    The head goes when its shape differs from the model's or its weight is all
    zeros (Google zeroed the ImageNet-21k head); pre-logits go when the model has
    none; the position embedding is resampled (resample_pos_embed) when the file
    was trained at another resolution. Anything else that differs raises
    WeightsError naming the keys, e.g. another patch size or width.
    """
    target = model.state_dict()
    state_dict = dict(state_dict)
    _check_patch_size(state_dict, target)
    left_out, reasons, notes = [], [], []

    if not any(k.startswith("pre_logits.") for k in target):
        dropped = [k for k in state_dict if k.startswith("pre_logits.")]
        if dropped:
            left_out += dropped
            reasons.append("the model has no pre-logits layer")
    head_keys = [k for k in state_dict if k.startswith("head.")]
    head_fits = all(k in target and target[k].shape == state_dict[k].shape for k in head_keys)
    if head_keys and (not head_fits or head_is_zero(state_dict)):
        left_out += head_keys
        if "head.weight" not in target:
            reasons.append("the model has no head")
        elif not head_fits:
            reasons.append(f"a new {target['head.weight'].shape[0]}-class head is trained")
        else:
            reasons.append("its head is all zeros, so a new one is trained")
    for key in left_out:
        state_dict.pop(key)

    old, new = state_dict.get("pos_embed"), target.get("pos_embed")
    if old is not None and new is not None and old.shape != new.shape and \
            old.shape[-1] == new.shape[-1]:
        new_grid = _grid_side(new)
        state_dict["pos_embed"] = resample_pos_embed(old, new_grid)
        old_grid = _grid_side(old)
        notes.append(f"resampled the position embedding from {old_grid}x{old_grid} to "
                     f"{new_grid}x{new_grid} (bicubic)")

    # The model keeps its freshly initialised head when the file has none to give.
    check_fits(state_dict, target, optional=("head.",))
    return state_dict, LoadReport(loaded=len(state_dict), left_out=left_out,
                                  reason="; ".join(reasons), notes=notes)


def _check_patch_size(state_dict: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                      ) -> None:
    theirs, ours = state_dict.get("patch_embed.proj.weight"), target.get("patch_embed.proj.weight")
    if theirs is None or ours is None or theirs.shape[-2:] == ours.shape[-2:]:
        return
    raise WeightsError(f"The weights have patch size {theirs.shape[-1]} in the file, "
                       f"{ours.shape[-1]} in the model: the file looks like "
                       f"{describe_architecture(state_dict)}, the model is "
                       f"{describe_architecture(target)}; build the model with "
                       f"patch_size={theirs.shape[-1]} (e.g. a vit_*_patch{theirs.shape[-1]}_* "
                       f"model).")


def check_fits(state_dict: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
               optional: tuple[str, ...] = ()) -> None:
    """Raise WeightsError unless state_dict has exactly target's keys and shapes.

    Keys of target that start with one of ``optional`` may be missing. The message
    names the first differing keys with their shapes and what each side looks like.
    """
    missing = [k for k in target if k not in state_dict and not k.startswith(optional)]
    unexpected = [k for k in state_dict if k not in target]
    wrong_shape = [k for k in state_dict if k in target and state_dict[k].shape != target[k].shape]
    problems = [f"{k} is {tuple(state_dict[k].shape)} in the file but {tuple(target[k].shape)} "
                f"in the model" for k in wrong_shape[:3]]
    if len(wrong_shape) > 3:
        problems.append(f"{len(wrong_shape) - 3} more shapes differ")
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if problems:
        raise WeightsError(f"The weights do not fit the model: {'; '.join(problems)}. The file "
                           f"looks like {describe_architecture(state_dict)}; the model is "
                           f"{describe_architecture(target)}.")


def _first(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------ the model for these weights

# VisionTransformer arguments that change what the same tensors compute but show in no
# tensor's shape, so a model for a file that states them must take them: Hugging Face
# files use layer_norm_eps 1e-12 where this project uses 1e-6 (the outputs drift slightly
# otherwise), and num_heads decides how each block splits the width into heads.
_STATED_ONLY = ("num_heads", "layer_norm_eps")
# What a named model must share with a file for the file's tensors to fit it.
_STRUCTURE = ("patch_size", "embed_dim", "depth")


def implied_model_args(weights: Weights) -> dict:
    """The VisionTransformer arguments a file implies: what its tensor shapes show (img_size,
    patch_size, embed_dim, depth, num_classes, 0 without a head, representation_size) and
    the num_heads / layer_norm_eps it states."""
    state_dict = weights.state_dict
    args = {}
    patch = state_dict.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        args["embed_dim"], args["patch_size"] = patch.shape[0], patch.shape[-1]
        if "pos_embed" in state_dict:
            args["img_size"] = _grid_side(state_dict["pos_embed"]) * patch.shape[-1]
    if _depth(state_dict):
        args["depth"] = _depth(state_dict)
    head, pre_logits = state_dict.get("head.weight"), state_dict.get("pre_logits.fc.weight")
    args["num_classes"] = head.shape[0] if head is not None else 0
    args["representation_size"] = pre_logits.shape[0] if pre_logits is not None else None
    return {**args, **_stated_args(weights)}


def _stated_args(weights: Weights) -> dict:
    return {key: weights.model_args[key] for key in _STATED_ONLY if key in weights.model_args}


def build_model_for(weights: Weights, model_name: str, fine_tune: dict | None = None
                    ) -> VisionTransformer:
    """The model these weights need, built but not loaded.

    This project's checkpoints (weights.complete_args) are rebuilt from their model_args as
    they are. Other files get the named model at the file's resolution, with its head,
    pre-logits and stated num_heads / layer_norm_eps (implied_model_args); the patch size,
    width and depth stay the named model's, so a file of another architecture is an error
    that names the model it needs, and the named model supplies what the file cannot say
    (mlp_ratio; num_heads where the file does not state it).

    To fine-tune, fine_tune holds the caller's constructor arguments (train.py: a new head,
    its resolution, drop path): the named model takes those and the file's stated num_heads
    / layer_norm_eps, and fit_state_dict adapts the file's head and position embedding.
    """
    if fine_tune is not None:
        try:
            return create_model(model_name, **{**_stated_args(weights), **fine_tune})
        except ValueError as err:  # an unknown name, or sizes that do not divide
            raise UserError(str(err)) from None
    if weights.complete_args:
        try:
            return VisionTransformer(**weights.model_args)
        except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. width -8
            raise WeightsError(f"The checkpoint's model_args do not build a model ({err}); "
                               f"they were changed after it was written.") from None
    implied = implied_model_args(weights)
    try:
        return create_model(model_name, **{k: v for k, v in implied.items()
                                           if k not in _STRUCTURE})
    except ValueError as err:
        if model_name not in list_models():
            raise WeightsError(str(err)) from None
        raise _misfit(weights, model_name) from None


def load_model_for(weights: Weights, model_name: str) -> VisionTransformer:
    """build_model_for, with the weights loaded with strict=True, in eval mode."""
    model = build_model_for(weights, model_name)
    try:
        check_fits(weights.state_dict, model.state_dict())
    except WeightsError as err:
        if weights.complete_args:
            raise
        raise WeightsError(f"{err} {_fitting_models_hint(weights, model_name)}".strip()) from None
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval()


def _misfit(weights: Weights, model_name: str) -> WeightsError:
    """The error for a file whose patch grid the named model cannot be built for."""
    named, implied = _registered_args(model_name), implied_model_args(weights)
    patch = implied.get("patch_size")
    grid = f", a {implied['img_size'] // patch}x{implied['img_size'] // patch} grid of " \
        f"{patch} px patches" if "img_size" in implied else ""
    return WeightsError(
        f"The weights do not fit {model_name} (patch size {named['patch_size']}, width "
        f"{named['embed_dim']}, {named['depth']} blocks, {named['num_heads']} heads): the file "
        f"holds {describe_architecture(weights.state_dict)}{grid}. "
        f"{_fitting_models_hint(weights, model_name)}".strip())


def _registered_args(model_name: str) -> dict:
    """A registered model's constructor arguments; built on the meta device, so no memory."""
    with torch.device("meta"):
        return create_model(model_name).model_args


def _fitting_models_hint(weights: Weights, model_name: str) -> str:
    """Which registered models have the file's patch size, width and depth, as advice."""
    implied = implied_model_args(weights)
    wanted = {key: implied.get(key) for key in _STRUCTURE}
    if "num_heads" in implied:
        wanted["num_heads"] = implied["num_heads"]
    registered = {name: _registered_args(name) for name in list_models()}
    fitting = [name for name, args in registered.items()
               if all(args[key] == value for key, value in wanted.items())]
    if model_name in fitting:
        return ""
    if fitting:
        return f"{' and '.join(fitting)} would fit: pass --model-name {fitting[0]}."
    return (f"No model of vit_model.py has the file's patch size {wanted['patch_size']}, "
            f"width {wanted['embed_dim']} and {wanted['depth']} blocks.")
