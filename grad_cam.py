"""Grad-CAM for the Vision Transformer: which patches raise the score of a class.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017 (arXiv:1610.02391). Eq. 1: the weight of feature channel k for class
c is the gradient of the class score y^c with respect to the activation A^k, averaged over
the positions; Eq. 2: the map is ReLU(sum_k weight_k A^k).

For a ViT the activations are tokens, not a feature map: the class token is dropped and the
patch tokens are laid back on the patch grid, row by row, as PatchEmbed flattened them. The
layer is the output of ``blocks[-1].norm1``, as in the reproduced repository's
``grad_cam/main_vit.py``: the head reads the class token alone, so the patch tokens that
leave the last block have no effect on the score and a zero gradient; the last place where
patch tokens matter is the input of the last block's attention, through which the class
token reads them.

The maps are scaled as the grad-cam package (pytorch-grad-cam) scales them, so the two agree
to float precision: per image, min-max on the patch grid, bilinear upsampling to the input
size, then min-max again, each time dividing by max + 1e-7 (a map that is zero everywhere
stays zero).

``vit_grad_cam`` is this project's function. ``GradCAM``, ``show_cam_on_image`` and
``center_crop_img`` have the signatures of the reproduced repository's ``grad_cam/utils.py``,
so its ``main_vit.py`` runs unchanged; they need neither OpenCV nor the grad-cam package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visualize import upsample

# The guard of pytorch-grad-cam's scale_cam_image, kept so the maps match its to 1e-5.
MIN_MAX_EPS = 1e-7

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]
TargetClasses = int | Sequence[int] | torch.Tensor | None


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1 + h*w, C) ViT tokens -> (B, C, h, w) feature map, the class token dropped."""
    batch, num_tokens, channels = tokens.shape
    height, width = grid
    if num_tokens != 1 + height * width:
        raise ValueError(f"{num_tokens} tokens do not make a class token and a "
                         f"{height}x{width} patch grid.")
    patches = tokens[:, 1:].reshape(batch, height, width, channels)  # row-major, as PatchEmbed
    return patches.permute(0, 3, 1, 2)                                 # (B, C, h, w)


def patch_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of patches the model makes of an image of (height, width) pixels."""
    # The patch embedding is a convolution whose kernel is the patch, whatever else
    # PatchEmbed stores about sizes.
    patch_h, patch_w = model.patch_embed.proj.kernel_size
    return image_size[0] // patch_h, image_size[1] // patch_w


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per map (first dimension), to [0, 1]: (x - min) / (max(x - min) + 1e-7)."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + MIN_MAX_EPS)
    return flat.view_as(maps)


def resolve_targets(target_classes: TargetClasses, logits: torch.Tensor) -> torch.Tensor:
    """The class per image: the predicted one (None), the same for all (int), or one each."""
    batch, num_classes = logits.shape
    if target_classes is None:
        return logits.argmax(dim=1)
    if isinstance(target_classes, int):
        target_classes = [target_classes] * batch
    targets = torch.as_tensor(target_classes, dtype=torch.long, device=logits.device).flatten()
    if targets.numel() != batch:
        raise ValueError(f"{targets.numel()} target classes for {batch} images.")
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"A target class is outside 0..{num_classes - 1}.")
    return targets


def activations_and_gradients(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
                              target_classes: TargetClasses = None
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Outputs of `layers` and the gradient of the summed target scores (logits) at them,
    with the target class of each image. The model's parameters' .grad stay untouched."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out))
               for layer in layers]
    try:
        # An input that needs a gradient builds the graph even when every parameter is frozen.
        images = images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(images)
            targets = resolve_targets(target_classes, logits)
            score = logits.gather(1, targets[:, None]).sum()  # images do not interact
            gradients = torch.autograd.grad(score, outputs)
    finally:
        for handle in handles:
            handle.remove()
    return [out.detach() for out in outputs], [g.detach() for g in gradients], targets


def cam_on_grid(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-2 on (B, C, h, w) activations and gradients: (B, h, w), not yet scaled."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)        # (B, C, 1, 1), Eq. 1
    return F.relu((weights * activation).sum(dim=1))        # (B, h, w), Eq. 2


def grad_cam(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
             reshape_transform: ReshapeTransform | None = None,
             target_classes: TargetClasses = None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] at the images' size, the mean over `layers`.

    Args:
        model: a classifier returning logits (B, classes); its train/eval mode is kept, so
            call model.eval() first for the maps of inference.
        images: (B, 3, H, W) as the model takes them.
        layers: modules whose outputs are the activations; several give the mean map.
        reshape_transform: turns a layer's output into (B, C, h, w); None if it is one.
        target_classes: see resolve_targets.
    """
    activations, gradients, _ = activations_and_gradients(model, images, layers, target_classes)
    reshape = reshape_transform or (lambda x: x)
    size = tuple(images.shape[-2:])
    maps = [upsample(min_max(cam_on_grid(reshape(a).float(), reshape(g).float())), size)
            for a, g in zip(activations, gradients, strict=True)]
    return min_max(torch.stack(maps).clamp(min=0).mean(dim=0))


def vit_grad_cam(model: nn.Module, images: torch.Tensor, target_classes: TargetClasses = None,
                 block: int = -1) -> torch.Tensor:
    """Grad-CAM of a VisionTransformer at ``blocks[block].norm1``: (B, H, W) in [0, 1].

    Args:
        model: a vit_model.VisionTransformer (any size, image size and patch size), in the
            mode the maps are wanted in (eval for inference).
        images: (B, 3, H, W), normalised as for the model.
        target_classes: the class of each image's map: None for the predicted class, an int
            for the same class for all, or one index per image.
        block: the block whose attention input is the layer; -1, the last, as the
            reproduced repository (any earlier block works too).
    """
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block {block} is outside the model's {depth} blocks "
                         f"({-depth}..{depth - 1}).")
    grid = patch_grid(model, tuple(images.shape[-2:]))
    return grad_cam(model, images, [model.blocks[block].norm1],
                    lambda tokens: tokens_to_grid(tokens, grid), target_classes)


# --------------------------------------------------------------------------- drop-in API


class GradCAM:
    """The reproduced repository's ``GradCAM``: ``cam(input_tensor=x, target_category=c)``
    returns float32 maps (B, H, W) in [0, 1] as a numpy array.

    Args:
        model: the classifier; it is put in eval mode, as the reproduced repository does.
        target_layers: modules whose outputs are the activations (their mean map is given).
        reshape_transform: turns a layer's output into (B, C, h, w), e.g. drops a ViT's
            class token and lays the patches on their grid (tokens_to_grid).
        use_cuda: move the model and the inputs to the GPU.

    It also works as ``with GradCAM(...) as cam:``, as the reproduced one does.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module],
                 reshape_transform: ReshapeTransform | None = None, use_cuda: bool = False
                 ) -> None:
        self.model = model.eval()
        self.target_layers = list(target_layers)
        self.cuda = use_cuda
        if use_cuda:
            self.model = model.cuda()
        self.reshape_transform = reshape_transform

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Nothing to undo: the hooks are put on for each call and taken off after it."""

    def __call__(self, input_tensor: torch.Tensor,
                 target_category: int | Sequence[int] | None = None) -> np.ndarray:
        if self.cuda:
            input_tensor = input_tensor.cuda()
        maps = grad_cam(self.model, input_tensor, self.target_layers, self.reshape_transform,
                        target_category)
        return maps.cpu().numpy().astype(np.float32)


# OpenCV's COLORMAP_* codes (what the reproduced repository passes) whose matplotlib colour
# map has the same name.
OPENCV_COLORMAPS = {0: "autumn", 1: "bone", 2: "jet", 3: "winter", 4: "rainbow", 5: "ocean",
                    6: "summer", 7: "spring", 8: "cool", 9: "hsv", 10: "pink", 11: "hot",
                    13: "magma", 14: "inferno", 15: "plasma", 16: "viridis", 17: "cividis",
                    18: "twilight", 19: "twilight_shifted", 20: "turbo"}


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False,
                      colormap: str | int = "jet") -> np.ndarray:
    """The image with the map over it as a heat map: uint8 (H, W, 3).

    The reproduced repository colours with OpenCV; this uses a matplotlib colour map
    (matplotlib is a dependency already, OpenCV is not), whose "jet" is close to OpenCV's
    COLORMAP_JET but not identical.

    Args:
        img: float (H, W, 3) in [0, 1], RGB or BGR.
        mask: (H, W), values in [0, 1] (outside is clipped), e.g. one map of GradCAM.
        use_rgb: True if img is RGB; False (as the reproduced repository's default, made
            for OpenCV's images) gives a BGR heat map for a BGR image.
        colormap: the name of a matplotlib colour map, or an OpenCV code such as
            cv2.COLORMAP_JET (2) for the matplotlib map of that name.
    """
    from matplotlib import colormaps

    name = OPENCV_COLORMAPS.get(colormap) if isinstance(colormap, int) else colormap
    if name not in colormaps:
        raise ValueError(f"colormap {colormap!r} is neither a matplotlib colour map nor an "
                         f"OpenCV COLORMAP_* code with a matplotlib twin; pass a name such "
                         f"as 'jet'.")

    img = np.asarray(img, dtype=np.float32)
    mask = np.asarray(mask)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"Expected an (H, W, 3) image, got shape {img.shape}.")
    if mask.shape != img.shape[:2]:
        raise ValueError(f"The mask's shape {mask.shape} is not the image's {img.shape[:2]}.")
    if img.min() < 0 or img.max() > 1:
        raise ValueError("The image should be float in [0, 1]; divide a uint8 image by 255.")
    # Integer indices pick the colour map's 256 entries, as OpenCV's applyColorMap does.
    levels = np.uint8(np.round(255 * np.clip(mask, 0.0, 1.0)))
    heatmap = colormaps[name](levels)[..., :3].astype(np.float32)  # RGB
    if not use_rgb:
        heatmap = heatmap[..., ::-1]
    overlay = heatmap + img
    return np.uint8(255 * overlay / overlay.max())


def overlay_on_crop(crop: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    """A map of any size (a patch grid, or a Grad-CAM map) as a heat map over the crop the
    model saw: uint8 (H, W, 3). The map is upsampled to the crop and scaled to [0, 1].

    Args:
        crop: (3, H, W) in [0, 1], the model's input with the normalisation undone.
        grid: (h, w), any values (attention weights, a Grad-CAM map).
    """
    size = tuple(crop.shape[-2:])
    heat = min_max(upsample(grid[None].float().cpu(), size))[0]
    picture = crop.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    return show_cam_on_image(picture, heat.numpy(), use_rgb=True)


def center_crop_img(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bilinear, antialiased) and cut the centre square:
    (H, W, C) or (H, W) -> (size, size[, C]), the same dtype."""
    from torchvision.transforms import functional as TF

    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}.")
    array = np.asarray(img)
    if array.ndim not in (2, 3):
        raise ValueError(f"Expected an (H, W) or (H, W, C) image, got shape {array.shape}.")
    if array.shape[:2] == (size, size):
        return array
    chw = torch.from_numpy(np.ascontiguousarray(array.reshape(*array.shape[:2], -1)))
    chw = chw.permute(2, 0, 1)                                   # (C, H, W)
    resized = TF.resize(chw, size, antialias=True)               # shorter side -> size
    cropped = TF.center_crop(resized, [size, size]).permute(1, 2, 0).numpy()
    return cropped.reshape(size, size, *array.shape[2:])
