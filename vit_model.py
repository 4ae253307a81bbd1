"""Vision Transformer (ViT) in one file.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021, arXiv:2010.11929. The layout follows the
official JAX code (google-research/vision_transformer, ``models_vit.py``); the
parameter names are those of timm and of the reproduced repository
(WZMIAOMIAO/deep-learning-for-image-processing), so their state dicts load
with ``strict=True``.

    PatchEmbed -> Attention -> Mlp -> Block -> VisionTransformer -> factories
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class PatchEmbed(nn.Module):
    """Split the image into patches and project each one linearly (Eq. 1, x_p E).

    img_size, patch_size and grid_size are (h, w) pairs, as in timm and the reproduced
    repository, whose scripts read them; an int means a square.
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224,
                 patch_size: int | tuple[int, int] = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}.")
        self.grid_size = (self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # A conv with kernel = stride = patch size is the same linear map as
        # flattening each patch and multiplying by E, only faster.
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if (height, width) != self.img_size:
            expected_h, expected_w = self.img_size
            fitting = height if height == width else (height, width)  # an int is a square
            raise ValueError(f"Input image size ({height}x{width}) does not match the model "
                             f"({expected_h}x{expected_w}); resize it to "
                             f"{expected_h}x{expected_w} or build the model with "
                             f"img_size={fitting}.")
        x = self.proj(x)                      # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)   # (B, N, C)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class Attention(nn.Module):
    """Multi-head self-attention, MSA in Eq. 2 (Vaswani et al. 2017, with qkv bias)."""

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused_attn: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # The fused kernel (flash / memory-efficient SDPA) never materialises the
        # N x N matrix; the explicit path exists to return attention weights.
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)    # each (B, nh, N, hd)
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v                   # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, C)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    """The two-layer MLP with exact GELU, MLP in Eq. 3."""

    def __init__(self, in_features: int, hidden_features: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact erf GELU, as the paper; not the tanh approximation
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob  # rescale so the expected output is unchanged

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_rate(module: nn.Module) -> float:
    """How often a module drops at random in training (dropout, drop-path); 0 for the rest."""
    if isinstance(module, nn.Dropout):
        return module.p
    if isinstance(module, DropPath):
        return module.drop_prob
    return 0.0


class Block(nn.Module):
    """Pre-LN encoder block: Eq. 2 z' = MSA(LN(z)) + z, then Eq. 3 z = MLP(LN(z')) + z'."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_norm_eps: float = 1e-6, fused_attn: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


# The constructor arguments a checkpoint records (VisionTransformer.model_args) so that they
# alone build the same network again; fused_attn is left out, a speed switch that changes no
# weight.
MODEL_ARG_NAMES = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                   "num_heads", "mlp_ratio", "qkv_bias", "representation_size", "drop_rate",
                   "attn_drop_rate", "drop_path_rate", "layer_norm_eps")


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token and position embedding, encoder, head.

    Args:
        img_size: side of the square input image in pixels, or its (height, width).
        patch_size: side of a square patch; img_size must be a multiple of it.
        in_chans: input channels.
        num_classes: outputs of the head; 0 gives no head (returns features).
        embed_dim: token width D.
        depth: number of encoder blocks L.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of embed_dim.
        qkv_bias: whether the q, k, v projections have a bias (ViT: yes).
        representation_size: width of the pre-logits layer (Linear + tanh) the
            ImageNet-21k checkpoints have; None leaves it out.
        drop_rate: dropout after the position embedding and in the MLP and
            attention output.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth rate of the last block, rising
            linearly from 0 at the first.
        layer_norm_eps: 1e-6 as the JAX code; Hugging Face files use 1e-12.
        fused_attn: use torch's scaled_dot_product_attention (same result as
            the explicit softmax, faster, less memory).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 representation_size: int | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 layer_norm_eps: float = 1e-6, fused_attn: bool = True) -> None:
        arguments = locals()  # read first, while it holds the arguments alone
        super().__init__()
        # Everything needed to build the same network again; checkpoints store it.
        self.model_args = {name: arguments[name] for name in MODEL_ARG_NAMES}
        self.embed_dim = embed_dim
        # The reproduced repository's name: True when a pre-logits layer sits before the head.
        self.has_logits = bool(representation_size)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # One position per patch plus one for the class token (197 for B/16 at 224).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path_rates[i],
                  layer_norm_eps=layer_norm_eps, fused_attn=fused_attn)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)

        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict([
                ("fc", nn.Linear(embed_dim, representation_size)),
                ("act", nn.Tanh()),
            ]))
            self.num_features = representation_size
        else:
            self.pre_logits = nn.Identity()
            self.num_features = embed_dim
        self.reset_classifier(num_classes)

        self.grad_checkpointing = False  # set_grad_checkpointing(True) to save memory
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as the original JAX code (google-research/vision_transformer) does."""
        nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name == "head":
                    # A zero head starts fine-tuning from a uniform prediction.
                    nn.init.zeros_(module.weight)
                elif name.startswith("pre_logits"):
                    lecun_normal_(module.weight)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if ".mlp." in f".{name}":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        """The head (timm's name)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new head of num_classes outputs, zero as init_weights makes it (timm's name);
        0 removes the head. The model's arguments follow, so a checkpoint rebuilds it."""
        self.num_classes = self.model_args["num_classes"] = num_classes
        like = self.norm.weight  # the new head lives where the model does
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device,
                               dtype=like.dtype) if num_classes > 0 else nn.Identity())
        for param in self.head.parameters():
            nn.init.zeros_(param)

    @property
    def image_size(self) -> int:
        """Side of the square input in pixels (torchvision's name); patch_embed has (h, w)."""
        return self.patch_embed.img_size[0]

    @property
    def fused_attn(self) -> bool:
        return all(block.attn.fused_attn for block in self.blocks)

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        for block in self.blocks:
            block.attn.fused_attn = value

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z0 = [x_class; x_p E] + E_pos, then dropout."""
        x = self.patch_embed(x)                                 # (B, N, C)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)   # (B, 1, C)
        x = torch.cat((cls_token, x), dim=1)                    # (B, 1 + N, C)
        return self.pos_drop(x + self.pos_embed)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (timm's name): less memory for about one more forward pass per training step."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embed and encode; returns the LayerNormed tokens (Eq. 4's LN), (B, 1 + N, C)."""
        x = self.embed(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.blocks:
                # Non-reentrant: works with inputs that need no grad. A block that drops at
                # random has its RNG state saved and restored, so that the recomputation
                # draws the same masks; the others skip that: a CUDA graph capture (train.py's
                # --cuda-graphs) forbids reading the GPU's RNG state.
                draws = any(drop_rate(module) > 0 for module in block.modules())
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=draws)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class token -> optional pre-logits -> head. pre_logits=True stops before the head."""
        x = self.pre_logits(x[:, 0])  # Eq. 4: y = LN(z_L^0); LN already applied
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, each (B, heads, 1 + N, 1 + N), explicit path."""
        x = self.embed(x)
        maps = []
        for block in self.blocks:
            x, attn = block(x, return_attention=True)
            maps.append(attn)
        return maps


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """JAX's lecun_normal: truncated normal at +-2 std, variance 1 / fan_in."""
    fan_in = weight[0].numel()
    # 0.8796 is the std of a unit normal truncated to [-2, 2]; divide to keep variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


# --------------------------------------------------------------------------- factories

_MODEL_REGISTRY: dict[str, Callable[..., VisionTransformer]] = {}


def register_model(factory: Callable[..., VisionTransformer]) -> Callable[..., VisionTransformer]:
    _MODEL_REGISTRY[factory.__name__] = factory
    return factory


def list_models() -> list[str]:
    return sorted(_MODEL_REGISTRY)


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a registered model; keyword overrides (num_classes, img_size, ...) win."""
    if name not in _MODEL_REGISTRY:
        raise ValueError(f"Unknown model '{name}'; choose one of: {', '.join(list_models())}.")
    return _MODEL_REGISTRY[name](**overrides)


def _build(sizes: dict, num_classes: int, has_logits: bool, overrides: dict
           ) -> VisionTransformer:
    # has_logits is the reproduced repository's switch for a pre-logits layer of width D
    # (as ViT's are); a representation_size override sets another width.
    width = overrides.get("embed_dim", sizes["embed_dim"])
    overrides.setdefault("representation_size", width if has_logits else None)
    return VisionTransformer(**{**sizes, "num_classes": num_classes, **overrides})


_DEMO = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4)
_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_BASE32 = dict(patch_size=32, embed_dim=768, depth=12, num_heads=12)
_LARGE16 = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
_LARGE32 = dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16)
_HUGE14 = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
_IN1K_CLASSES = 1000
_IN21K_CLASSES = 21843

# The factories take (num_classes, has_logits) by position too, as the reproduced
# repository's do; any VisionTransformer argument can follow by keyword.


@register_model
def vit_demo_patch8_64(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                       **overrides) -> VisionTransformer:
    """A 0.8M-parameter ViT at 64 px for the offline demo and tests; no public weights."""
    return _build(_DEMO, num_classes, has_logits, overrides)


@register_model
def vit_tiny_patch16_224(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                         **overrides) -> VisionTransformer:
    """ViT-Ti/16 (DeiT sizes), for CPU work; timm publishes weights."""
    return _build(_TINY, num_classes, has_logits, overrides)


@register_model
def vit_small_patch16_224(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                          **overrides) -> VisionTransformer:
    """ViT-S/16 (DeiT sizes), for CPU work; timm publishes weights."""
    return _build(_SMALL, num_classes, has_logits, overrides)


@register_model
def vit_base_patch16_224(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                         **overrides) -> VisionTransformer:
    """ViT-B/16, 1000 classes: timm `vit_base_patch16_224`, torchvision `vit_b_16`."""
    return _build(_BASE16, num_classes, has_logits, overrides)


@register_model
def vit_base_patch16_224_in21k(num_classes: int = _IN21K_CLASSES, has_logits: bool = True,
                               **overrides) -> VisionTransformer:
    """ViT-B/16 pretrained on ImageNet-21k, with pre-logits.

    Weights: `jx_vit_base_patch16_224_in21k-e5005f0a.pth` (timm release v0.1-vitjx; the
    reproduced repository's `vit_base_patch16_224_in21k.pth`) or Google's `ViT-B_16.npz`.
    """
    return _build(_BASE16, num_classes, has_logits, overrides)


@register_model
def vit_base_patch32_224(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                         **overrides) -> VisionTransformer:
    """ViT-B/32, 1000 classes: timm `vit_base_patch32_224`, torchvision `vit_b_32`."""
    return _build(_BASE32, num_classes, has_logits, overrides)


@register_model
def vit_base_patch32_224_in21k(num_classes: int = _IN21K_CLASSES, has_logits: bool = True,
                               **overrides) -> VisionTransformer:
    """ViT-B/32 on ImageNet-21k: `jx_vit_base_patch32_224_in21k-8db57226.pth`, `ViT-B_32.npz`."""
    return _build(_BASE32, num_classes, has_logits, overrides)


@register_model
def vit_large_patch16_224(num_classes: int = _IN1K_CLASSES, has_logits: bool = False,
                          **overrides) -> VisionTransformer:
    """ViT-L/16, 1000 classes: timm `vit_large_patch16_224`, torchvision `vit_l_16`."""
    return _build(_LARGE16, num_classes, has_logits, overrides)


@register_model
def vit_large_patch16_224_in21k(num_classes: int = _IN21K_CLASSES, has_logits: bool = True,
                                **overrides) -> VisionTransformer:
    """ViT-L/16 on ImageNet-21k: `jx_vit_large_patch16_224_in21k-606da67d.pth`, `ViT-L_16.npz`."""
    return _build(_LARGE16, num_classes, has_logits, overrides)


@register_model
def vit_large_patch32_224_in21k(num_classes: int = _IN21K_CLASSES, has_logits: bool = True,
                                **overrides) -> VisionTransformer:
    """ViT-L/32 on ImageNet-21k: `jx_vit_large_patch32_224_in21k-9046d2e7.pth`, `ViT-L_32.npz`."""
    return _build(_LARGE32, num_classes, has_logits, overrides)


@register_model
def vit_huge_patch14_224_in21k(num_classes: int = _IN21K_CLASSES, has_logits: bool = True,
                               **overrides) -> VisionTransformer:
    """ViT-H/14 on ImageNet-21k: Google's `imagenet21k/ViT-H_14.npz`."""
    return _build(_HUGE14, num_classes, has_logits, overrides)
