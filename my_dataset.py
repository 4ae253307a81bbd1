"""Image files -> tensors: the data set, its transforms and a tolerant image reader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

# Matched case-insensitively, so .JPG and .jpeg count (the reproduced code skipped .jpeg).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
# The short form error messages show, e.g. "(.jpg, .jpeg, .png, ...)".
IMG_EXTENSIONS_HINT = ", ".join(IMG_EXTENSIONS[:3]) + ", ..."

# The paper and the report map pixels to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def open_rgb(path: str | Path, exif_transpose: bool = False) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, CMYK, palette, alpha and 16-bit are converted.

    With exif_transpose the pixels are turned as the EXIF Orientation tag says, so a phone
    photo comes out upright as a viewer shows it; the reproduced repository did not do this.
    """
    with Image.open(path) as img:
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (and 32-bit integer) grey: PIL's convert("RGB") clips at 255, so scale instead.
        # I;16 is 16-bit whatever its values (a dark image stays dark); 32-bit "I" states no
        # range, so only a value above 255 marks it as 16-bit.
        values = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "I" or values.max() > 255 else 255.0
        img = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        span = max(values.max() - values.min(), 1e-12)
        img = Image.fromarray(((values - values.min()) / span * 255.0).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        # Transparent pixels carry arbitrary colours; show them on white, as a viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def check_image(path: str | Path) -> str | None:
    """Decode the file cheaply; return why it cannot be read, or None when it can."""
    try:
        with Image.open(path) as img:
            # For JPEG, draft() decodes at 1/8 scale: the whole stream is still read,
            # so truncation shows, at a fraction of the cost of a full decode.
            img.draft("RGB", (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
        return None
    except Exception as err:  # PIL raises many types for broken files
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        return text[:120]


def eval_resize_size(img_size: int) -> int:
    """The shorter side evaluation resizes to before CenterCrop(img_size): 256 for 224, scaled."""
    return int(round(img_size * 256 / 224))


def eval_resize_shape(height: int, width: int, img_size: int) -> tuple[int, int]:
    """(h, w) of a height x width image after Resize(eval_resize_size(img_size)).

    torchvision's rule for Resize(int): the shorter side becomes that size and the longer
    keeps the aspect ratio, truncated to an int. Pipelines that resize themselves use this.
    """
    short_side = eval_resize_size(img_size)
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def build_transforms(img_size: int = 224, train: bool = True) -> Callable:
    """The report's transforms: RandomResizedCrop + flip to train; Resize 256, CenterCrop 224."""
    if train:
        return transforms.Compose([
            transforms.RandomResizedCrop(img_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])
    return transforms.Compose([
        transforms.Resize(eval_resize_size(img_size)),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the transforms' Normalize: (B, 3, H, W) in [0, 1], the pixels the model saw."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return images * std + mean


class MyDataSet(Dataset):
    """Images and their class indices, read as RGB (the reproduced repository's name)."""

    def __init__(self, images_path: Sequence[str | Path], images_class: Sequence[int],
                 transform: Callable | None = None, exif_transpose: bool = False) -> None:
        if len(images_path) != len(images_class):
            raise ValueError("images_path and images_class differ in length.")
        self.images_path = [str(p) for p in images_path]
        self.images_class = list(images_class)
        self.transform = transform
        self.exif_transpose = exif_transpose  # see open_rgb; off as in the reproduced repository

    def __len__(self) -> int:
        return len(self.images_path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = open_rgb(self.images_path[index], self.exif_transpose)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.images_class[index]

    @staticmethod
    def collate_fn(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples -> (images (B, 3, H, W), labels (B,) int64), for DataLoader(collate_fn=...).

        The DataLoader's default does the same; the reproduced repository's scripts pass this.
        """
        images, labels = zip(*batch, strict=True)
        return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


class SeededSamples(Dataset):
    """dataset[(index, seed)]: sample `index`, its random transforms drawn from `seed`.

    torchvision's transforms draw from torch's global generator, which each loader worker
    keeps for the whole run and no checkpoint holds. Seeding it per sample (the seeds come
    from distributed.ShardSampler(sample_seeds=True)) makes a sample's crop and flip the same
    whatever --workers is and in a resumed run. The caller's own generator state is kept.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU's only: CUDA's is the model's
            return self.dataset[index]
