"""Weights files as each library writes them, for the tests of weights.py and its users.

Every helper fills its model with random numbers (randomize_), so a wrong mapping changes
the outputs and cannot pass.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from vit_model import VisionTransformer
from weights import Weights


class SideEffect:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# A tiny ViT every library can build: 32 px, 8 px patches (4x4 grid), width 64, 2 blocks.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-fill every parameter so a wrong mapping cannot hide behind default init."""
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if id(param) in norm_weights else 0.05 * noise)
    return module.eval()


def images(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, f"relative difference {error:.2e}"


def ours(weights: Weights | dict, **kwargs) -> VisionTransformer:
    """Our model with TINY + kwargs, loaded with strict=True, in eval mode."""
    state_dict = weights.state_dict if isinstance(weights, Weights) else weights
    model = VisionTransformer(**{**TINY, **kwargs})
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def random_ours(seed: int = 0, **kwargs) -> VisionTransformer:
    return randomize_(VisionTransformer(**{**TINY, "num_classes": 10, **kwargs}), seed)


def timm_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    return TimmViT(**{**TINY, "global_pool": "token", **kwargs})


def hf_config(**kwargs):
    import transformers
    return transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, image_size=32, patch_size=8,
                                  attn_implementation="eager", **kwargs)


def hf_files(reference: nn.Module, tmp_path, layout: str):
    """Save a Hugging Face model the ways people have it; return the path to pass."""
    folder = tmp_path / "hf"
    reference.save_pretrained(folder)
    if layout == "folder":
        return folder
    if layout == "model.safetensors":
        return folder / "model.safetensors"
    # transformers < 5 wrote torch.save(state_dict) with the names on the hub
    # (safe_serialization=False); transformers 5 saves safetensors only.
    from safetensors.torch import load_file
    bin_folder = tmp_path / "hf_bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    if layout == "pytorch_model.bin folder":
        torch.save(load_file(folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
        return bin_folder
    if layout == "transformers 5 state_dict()":  # its in-memory names: layers.i.attention.q_proj
        torch.save(reference.state_dict(), bin_folder / "pytorch_model.bin")
        return bin_folder / "pytorch_model.bin"
    raise AssertionError(layout)


HF_LAYOUTS = ["folder", "model.safetensors", "pytorch_model.bin folder",
              "transformers 5 state_dict()"]


def google_npz_arrays(state_dict: dict[str, torch.Tensor], num_heads: int) -> dict:
    """Our state dict in the layout of Google's ViT-B_16.npz (weights.py maps it back)."""
    def a(tensor):
        return tensor.detach().numpy().copy()

    width = state_dict["cls_token"].shape[-1]
    head_dim = width // num_heads
    out = {
        "cls": a(state_dict["cls_token"]),
        "embedding/kernel": a(state_dict["patch_embed.proj.weight"].permute(2, 3, 1, 0)),  # HWIO
        "embedding/bias": a(state_dict["patch_embed.proj.bias"]),
        "Transformer/posembed_input/pos_embedding": a(state_dict["pos_embed"]),
        "Transformer/encoder_norm/scale": a(state_dict["norm.weight"]),
        "Transformer/encoder_norm/bias": a(state_dict["norm.bias"]),
    }
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for i in range(depth):
        ours_, theirs = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attention = theirs + "MultiHeadDotProductAttention_1/"
        qkv_weight = state_dict[ours_ + "attn.qkv.weight"].chunk(3)
        qkv_bias = state_dict[ours_ + "attn.qkv.bias"].chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), qkv_weight, qkv_bias,
                                      strict=True):
            out[f"{attention}{name}/kernel"] = a(weight.t().reshape(width, num_heads, head_dim))
            out[f"{attention}{name}/bias"] = a(bias.reshape(num_heads, head_dim))
        out[f"{attention}out/kernel"] = a(
            state_dict[ours_ + "attn.proj.weight"].t().reshape(num_heads, head_dim, width))
        out[f"{attention}out/bias"] = a(state_dict[ours_ + "attn.proj.bias"])
        for google, mine in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{theirs}{google}/scale"] = a(state_dict[f"{ours_}{mine}.weight"])
            out[f"{theirs}{google}/bias"] = a(state_dict[f"{ours_}{mine}.bias"])
        for google, mine in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{theirs}MlpBlock_3/{google}/kernel"] = a(
                state_dict[f"{ours_}mlp.{mine}.weight"].t())
            out[f"{theirs}MlpBlock_3/{google}/bias"] = a(state_dict[f"{ours_}mlp.{mine}.bias"])
    for google, mine in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if f"{mine}.weight" in state_dict:
            out[f"{google}/kernel"] = a(state_dict[f"{mine}.weight"].t())
            out[f"{google}/bias"] = a(state_dict[f"{mine}.bias"])
    return out
