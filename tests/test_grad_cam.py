"""grad_cam.py: maps equal the grad-cam package's, land on the one patch that carries content,
and work for any grid and patch shape; the reproduced repository's drop-in API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from grad_cam import (
    OPENCV_COLORMAPS,
    GradCAM,
    center_crop_img,
    patch_grid,
    show_cam_on_image,
    tokens_to_grid,
    vit_grad_cam,
)
from vit_model import VisionTransformer, create_model

CLASSES = 3


class FreeSizePatchEmbed(nn.Module):
    """PatchEmbed's projection without its square-size check, for grids PatchEmbed does not
    build yet (h != w) and for non-square patches."""

    def __init__(self, proj: nn.Conv2d) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), row-major as PatchEmbed


def tiny_vit(*, grid: tuple[int, int] = (4, 4), patch: tuple[int, int] = (8, 8),
             depth: int = 2, seed: int = 0) -> VisionTransformer:
    """A random ViT (embed 32, 4 heads) for a grid of patches; the head is random too, since
    the zero head of init_weights has zero gradients and every map would be 0."""
    torch.manual_seed(seed)
    model = create_model("vit_demo_patch8_64", img_size=8 * grid[0], patch_size=8,
                         embed_dim=32, depth=depth, num_heads=4, num_classes=CLASSES)
    if grid[0] != grid[1] or patch != (8, 8):
        model.patch_embed = FreeSizePatchEmbed(nn.Conv2d(3, 32, kernel_size=patch, stride=patch))
        model.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + grid[0] * grid[1], 32))
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def image_size(grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    return grid[0] * patch[0], grid[1] * patch[1]


SHAPES = [((4, 4), (8, 8)), ((3, 5), (8, 8)), ((5, 3), (4, 8)), ((2, 2), (16, 16))]


# --------------------------------------------------------------------------- vs grad-cam


@pytest.mark.parametrize("grid, patch", SHAPES)
@pytest.mark.parametrize("targets", [None, [2, 0]])
def test_matches_the_grad_cam_package(grid, patch, targets):
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = tiny_vit(grid=grid, patch=patch)
    images = torch.randn(2, 3, *image_size(grid, patch))
    ours = vit_grad_cam(model, images, target_classes=targets)

    reference = pytorch_grad_cam.GradCAM(
        model=model, target_layers=[model.blocks[-1].norm1],
        reshape_transform=lambda tokens: tokens_to_grid(tokens, grid))
    wanted = None if targets is None else [ClassifierOutputTarget(c) for c in targets]
    theirs = reference(input_tensor=images, targets=wanted)

    assert ours.shape == (2, *image_size(grid, patch))
    assert ours.amax(dim=(1, 2)).min() > 0.99  # a real map, not the all-zero one
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- known answer


def one_patch_model(grid: tuple[int, int], patch: tuple[int, int], depth: int) -> nn.Module:
    """A random ViT whose blank patches become exactly zero tokens at block 0's norm1:
    no conv bias, no position embedding, a zero class token, LayerNorm(0) = its zero bias.
    Classes 0 and 1 have opposite head weights, so they see any patch with opposite sign."""
    model = tiny_vit(grid=grid, patch=patch, depth=depth, seed=1)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
        model.head.weight[1] = -model.head.weight[0]
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize("grid, patch", SHAPES[:3])
@pytest.mark.parametrize("depth, block", [(1, -1), (3, 0)])
def test_the_one_patch_with_content_is_the_map(grid, patch, depth, block):
    """Grad-CAM sums activations weighted by gradients, so a patch whose activation is zero
    scores zero whatever the gradient. With every patch blank but one, the grid map is that
    patch alone for the class it raises and zero everywhere for the class it lowers."""
    model = one_patch_model(grid, patch, depth)
    height, width = image_size(grid, patch)
    row, col = grid[0] - 1, 1   # off the diagonal, so a swapped h and w would show
    images = torch.zeros(2, 3, height, width)
    box = (slice(row * patch[0], (row + 1) * patch[0]), slice(col * patch[1], (col + 1) * patch[1]))
    images[(slice(None), slice(None), *box)] = torch.rand(3, patch[0], patch[1]) + 0.5

    maps = vit_grad_cam(model, images, target_classes=[0, 1], block=block)
    raising, lowering = (0, 1) if maps[0].max() > 0 else (1, 0)
    hot = maps[raising]
    assert hot.max() == pytest.approx(1.0)
    assert torch.all(maps[lowering] == 0)
    # Bilinear upsampling spreads the patch at most half a patch beyond its edges.
    inside = torch.zeros_like(hot, dtype=torch.bool)
    near = (slice(max(0, row * patch[0] - patch[0] // 2), (row + 1) * patch[0] + patch[0] // 2),
            slice(max(0, col * patch[1] - patch[1] // 2), (col + 1) * patch[1] + patch[1] // 2))
    inside[near] = True
    assert torch.all(hot[~inside] == 0)
    peak_y, peak_x = divmod(int(hot.argmax()), width)
    assert (peak_y // patch[0], peak_x // patch[1]) == (row, col)


# --------------------------------------------------------------------------- behaviour


def test_drop_in_grad_cam_agrees_with_vit_grad_cam():
    model = tiny_vit(grid=(3, 5))
    images = torch.randn(2, 3, 24, 40)
    grid = patch_grid(model, (24, 40))
    cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], use_cuda=False,
                  reshape_transform=lambda tokens: tokens_to_grid(tokens, grid))
    for target in (None, 1, [2, 0]):
        maps = cam(input_tensor=images, target_category=target)
        assert isinstance(maps, np.ndarray) and maps.dtype == np.float32
        assert maps.shape == (2, 24, 40)
        np.testing.assert_allclose(maps, vit_grad_cam(model, images, target).numpy(), atol=1e-6)
    # The reproduced main_vit.py: the reshape transform third, by position, in a with block.
    with GradCAM(model, [model.blocks[-1].norm1], lambda t: tokens_to_grid(t, grid)) as same:
        np.testing.assert_array_equal(same(images, 1), cam(images, 1))


def test_predicted_class_is_the_default():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    predicted = model(images).argmax(dim=1).tolist()
    torch.testing.assert_close(vit_grad_cam(model, images), vit_grad_cam(model, images, predicted))


def test_images_in_a_batch_do_not_interact():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    batch = vit_grad_cam(model, images, [0, 1, 2])
    singles = torch.cat([vit_grad_cam(model, images[i:i + 1], [i]) for i in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)


def test_fused_and_explicit_attention_give_the_same_map():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    fused = vit_grad_cam(model, images, [0, 1])
    model.fused_attn = False
    torch.testing.assert_close(fused, vit_grad_cam(model, images, [0, 1]), atol=1e-5, rtol=0)


def test_frozen_model_and_no_grad_context_work_and_leave_grads_alone():
    model = tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    expected = vit_grad_cam(model, images, [1])
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(vit_grad_cam(model, images, [1]), expected)


def test_every_map_is_in_zero_one_and_another_block_differs():
    model = tiny_vit(depth=3)
    images = torch.randn(2, 3, 32, 32)
    last, first = vit_grad_cam(model, images, [0, 1]), vit_grad_cam(model, images, [0, 1], 0)
    for maps in (last, first):
        assert maps.min() >= 0 and maps.max() <= 1
    assert not torch.allclose(last, first)


def test_bad_targets_and_blocks_say_what_is_wrong():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="outside 0..2"):
        vit_grad_cam(model, images, [0, 3])
    with pytest.raises(ValueError, match="1 target classes for 2 images"):
        vit_grad_cam(model, images, [0])
    with pytest.raises(ValueError, match="block 2 is outside the model's 2 blocks"):
        vit_grad_cam(model, images, block=2)


# --------------------------------------------------------------------------- pictures


def test_show_cam_on_image_is_uint8_rgb_or_bgr():
    rng = np.random.default_rng(0)
    img = rng.random((24, 40, 3), dtype=np.float32)
    mask = np.zeros((24, 40), dtype=np.float32)
    mask[:, 20:] = 1.0
    rgb = show_cam_on_image(img, mask, use_rgb=True)
    bgr = show_cam_on_image(img[..., ::-1], mask, use_rgb=False)
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 40, 3)
    assert rgb.max() == 255                      # scaled by its maximum, as the original
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])
    # jet: blue where the map is 0, red where it is 1, over the same image.
    blank = show_cam_on_image(np.zeros_like(img), mask, use_rgb=True).astype(int)
    assert blank[0, 0, 2] > blank[0, 0, 0] and blank[0, -1, 0] > blank[0, -1, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        show_cam_on_image(img * 255, mask)
    with pytest.raises(ValueError, match="pass a name such as 'jet'"):
        show_cam_on_image(img, mask, colormap=12)  # OpenCV's PARULA: matplotlib has none
    with pytest.raises(ValueError, match="shape"):
        show_cam_on_image(img, mask[:, :30])


def test_show_cam_on_image_takes_opencvs_colormap_codes():
    import cv2  # the reproduced repository passes cv2.COLORMAP_JET

    for code, name in OPENCV_COLORMAPS.items():
        assert getattr(cv2, f"COLORMAP_{name.upper()}") == code, name
    img = np.full((8, 8, 3), 0.5, dtype=np.float32)
    mask = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(show_cam_on_image(img, mask, colormap=cv2.COLORMAP_JET),
                                  show_cam_on_image(img, mask, colormap="jet"))


@pytest.mark.parametrize("shape", [(300, 200, 3), (200, 300, 3), (224, 224, 3), (90, 120)])
def test_center_crop_img(shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = center_crop_img(img, 224)
    assert out.shape == (224, 224, *shape[2:]) and out.dtype == np.uint8
    if shape[:2] == (224, 224):
        assert out is img


def test_center_crop_img_keeps_the_centre():
    img = np.zeros((100, 300, 3), dtype=np.uint8)
    img[:, 90:210] = 255                     # white around the centre square, black sides
    out = center_crop_img(img, 50)           # 100x300 -> 50x150 -> the middle 50x50
    assert out.min() == 255
