"""A data pipeline that lives on the training device: decode once, augment tensors there.

The PIL pipeline (my_dataset.MyDataSet in a DataLoader) decodes every JPEG again in every
epoch on the CPU; on a fast GPU a frozen-backbone ViT-B/16 epoch is then bound by JPEG
decoding rather than by the model (BENCHMARKS.md has the numbers). Here instead

1. DecodedImages reads every file's bytes once and decodes the JPEGs in batches with
   ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA; libjpeg-turbo in a
   thread pool on the CPU); files decode_jpeg does not take (PNG, CMYK JPEGs, ...) go
   through my_dataset.open_rgb, so every image becomes 8-bit RGB as in MyDataSet. It keeps
   them as uint8 tensors on the device: whole, (3, H, W), for training (about 2 GB for the
   3670 flower_photos images); for evaluation only my_dataset's evaluation view,
   Resize(eval_resize_size(S)) + CenterCrop(S), computed once;
2. DeviceTrainLoader draws RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) and
   RandomHorizontalFlip(0.5) per image and epoch from a seeded CPU generator, then crops
   and resizes each image on the device;
3. DeviceEvalLoader serves the evaluation crops in file order.

Batches are (images (B, 3, S, S) float32, labels (B,) int64), both already on the device,
normalised with my_dataset's MEAN and STD as build_transforms does.

Differences from the PIL pipeline (measured in tests/test_device_data.py):
- Resizing is torch's bilinear interpolation with antialias=True, the same triangle filter
  as PIL's BILINEAR resize. On the CPU torch's uint8 kernel rounds as PIL does; on CUDA it
  runs in float32 (eval images are rounded once to uint8, training crops not at all). On the
  CPU, outputs differ from the PIL pipeline's by at most one grey level (tests measure it).
- On CUDA, nvJPEG decodes: its IDCT and chroma upsampling differ from libjpeg-turbo's (which
  PIL and the CPU path use), by a fraction of a grey level on average and by several at
  single pixels (BENCHMARKS.md, "device_data on CUDA vs the CPU path").
- The crop parameters follow torchvision's RandomResizedCrop.get_params (up to 10 tries,
  then the central fallback) and the same distributions, drawn from our own generator: the
  same seed does not give the same crops as the PIL pipeline, but the same seed and epoch
  always give the same crops here, so a resumed run repeats its epochs.
- With world_size > 1 every process keeps a fixed shard (every world_size-th image) and
  shuffles it each epoch, where DistributedSampler reshuffles the whole set across ranks.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from my_dataset import MEAN, STD, eval_resize_shape, open_rgb, to_rgb

# Fractions of memory the decoded images may take: on CUDA of what is free now (the model,
# its gradients and activations need the rest); on the CPU of the physical RAM.
CUDA_MEMORY_FRACTION = 0.5
CPU_MEMORY_FRACTION = 0.25
DECODE_CHUNK = 256  # files per decode_jpeg call: bounds nvJPEG's temporary buffers


class DeviceMemoryError(RuntimeError):
    """The decoded images would not fit; the caller can fall back to the PIL DataLoader."""


@dataclass
class _FileInfo:
    data: bytearray  # the file's bytes, writable so that torch.frombuffer need not copy them
    width: int
    height: int
    jpeg: bool  # an 8-bit JPEG that decode_jpeg can turn into RGB (YCbCr, RGB or greyscale)


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic...): their
# segment holds precision, height, width and the number of colour components.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF})


def jpeg_header(data: bytes | bytearray) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG's frame header; None if not found.

    Walks the marker segments up to the first SOF: a few microseconds, where PIL's
    Image.open takes about a hundred, and the probe runs once per file.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 10 > end:
                return None
            return (data[pos + 4], int.from_bytes(data[pos + 5:pos + 7], "big"),
                    int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9])
        if marker in (0xD9, 0xDA) or length < 2:  # end of image or scan before any frame
            return None
        pos += 2 + length
    return None


def _probe(path: Path) -> _FileInfo:
    """Read the bytes once and find size and kind: from the JPEG header, else through PIL."""
    with path.open("rb") as handle:
        data = bytearray(os.fstat(handle.fileno()).st_size)
        del data[handle.readinto(data):]  # in case the file shrank meanwhile
    header = jpeg_header(data)
    if header is not None:
        precision, height, width, components = header
        if height > 0 and width > 0:
            # 4 components is CMYK or YCCK, and 12-bit JPEGs exist: PIL reads those.
            return _FileInfo(data, width, height, precision == 8 and components in (1, 3))
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as err:  # PIL raises many types for broken files
        raise ValueError(f"{path} cannot be read as an image ({err}).") from None
    return _FileInfo(data, width, height, False)


def memory_limit(device: torch.device) -> int:
    """Bytes the decoded images may take on `device` (see CUDA/CPU_MEMORY_FRACTION)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * CPU_MEMORY_FRACTION)


def crop_params(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop.get_params for N images at once: (top, left, height, width), each (N,).

    Same sampling as torchvision: up to `tries` draws of area fraction ~ U(scale) and
    log aspect ratio ~ U(log ratio); the first that fits wins; otherwise a central crop
    clamped to the ratio range.
    """
    heights, widths = heights.double(), widths.double()
    n = heights.shape[0]
    area = (heights * widths)[:, None]                                       # (N, 1)
    target_area = area * torch.empty(n, tries, dtype=torch.float64).uniform_(
        scale[0], scale[1], generator=generator)                             # (N, tries)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.empty(n, tries, dtype=torch.float64).uniform_(
        log_lo, log_hi, generator=generator))
    # torch.round, like Python's round, rounds halves to even.
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.double().argmax(dim=1)                      # index of the first fit (0 if none)
    found = fits.any(dim=1)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    # Uniform offsets, as torch.randint(0, H - h + 1) would draw them.
    u_top = torch.rand(n, dtype=torch.float64, generator=generator)
    u_left = torch.rand(n, dtype=torch.float64, generator=generator)
    top = torch.floor(u_top * (heights - h + 1)).clamp_max(heights - h)
    left = torch.floor(u_left * (widths - w + 1)).clamp_max(widths - w)

    # The fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    in_ratio = widths / heights
    fw, fh = widths.clone(), heights.clone()
    narrow = in_ratio < min(ratio)
    wide = in_ratio > max(ratio)
    fh[narrow] = torch.round(fw[narrow] / min(ratio))
    fw[wide] = torch.round(fh[wide] * max(ratio))
    ftop = torch.div(heights - fh, 2, rounding_mode="floor")
    fleft = torch.div(widths - fw, 2, rounding_mode="floor")

    top = torch.where(found, top, ftop).long()
    left = torch.where(found, left, fleft).long()
    h = torch.where(found, h, fh).long()
    w = torch.where(found, w, fw).long()
    return top, left, h, w


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(to_rgb(img), dtype=np.uint8)              # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()   # (3, H, W)


def _decode_on_cpu(info: _FileInfo, path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    if info.jpeg:
        try:
            data = torch.frombuffer(info.data, dtype=torch.uint8)
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
            if image.shape[0] == 3:
                return image
        except RuntimeError:
            pass  # libjpeg-turbo refused it; PIL may still read it
    return _pil_to_tensor(open_rgb(path))


def _decode_on_cuda(infos: Sequence[_FileInfo], paths: Sequence[Path],
                    device: torch.device) -> list[torch.Tensor]:
    """nvJPEG over a chunk; anything it refuses is decoded on the CPU and copied over."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(infos)
    jpeg_at = [k for k, info in enumerate(infos) if info.jpeg]
    # nvJPEG writes its outputs from a stream of its own without waiting for this one: memory
    # the allocator hands back, freed by kernels still queued here, must be done with first.
    torch.cuda.synchronize(device)
    if jpeg_at:
        datas = [torch.frombuffer(infos[k].data, dtype=torch.uint8) for k in jpeg_at]
        try:
            # torchvision >= 0.19 decodes a list in one batched nvJPEG call.
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, TypeError):
            decoded = []  # one bad file fails the whole batch: retry one by one below
        if len(decoded) == len(jpeg_at):
            for k, image in zip(jpeg_at, decoded, strict=True):
                out[k] = image
        else:
            for k, data in zip(jpeg_at, datas, strict=True):
                try:
                    out[k] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    for k, image in enumerate(out):
        if image is None or image.shape[0] != 3 or image.shape[1:] != (infos[k].height,
                                                                       infos[k].width):
            out[k] = _decode_on_cpu(infos[k], paths[k]).to(device)
    torch.cuda.synchronize(device)  # nvJPEG works on its own stream; be done before use
    return out  # type: ignore[return-value]


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, *size) float32 in [0, 255], bilinear with antialias."""
    x = image.unsqueeze(0)
    if tuple(x.shape[-2:]) == tuple(size):
        return x[0].float()
    if x.device.type == "cpu":
        # The CPU has a uint8 kernel (Pillow-SIMD's algorithm): several times faster than
        # PIL and than float32, and it rounds as PIL does. It wants a contiguous crop.
        x = F.interpolate(x.contiguous(), size=size, mode="bilinear", antialias=True,
                          align_corners=False)
        return x[0].float()
    # CUDA interpolates floats only; the result is not rounded to grey levels.
    x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0]


class Normalise:
    """[0, 255] floats -> ToTensor's /255, then Normalize(MEAN, STD), in place.

    (x / 255 - mean) / std is (x - 255 mean) / (255 std): one subtraction and one division
    per pixel, with my_dataset's MEAN and STD, so both pipelines normalise alike.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.shift = 255.0 * torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.scale = 255.0 * torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.sub_(self.shift).div_(self.scale)                       # (B, 3, S, S)


def eval_crop(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """my_dataset's evaluation view: Resize(eval_resize_size) + CenterCrop, as uint8 (3, S, S)."""
    new_h, new_w = eval_resize_shape(image.shape[-2], image.shape[-1], img_size)
    # The shorter side becomes eval_resize_size(S) >= S, so CenterCrop never has to pad.
    resized = _resize(image, (new_h, new_w))
    top = int(round((new_h - img_size) / 2.0))  # CenterCrop's rounding
    left = int(round((new_w - img_size) / 2.0))
    crop = resized[:, top:top + img_size, left:left + img_size]
    return crop.round_().clamp_(0, 255).to(torch.uint8)


class DecodedImages:
    """One split's files read and decoded once, kept on the device: what both loaders share.

    Every file is read once and its size found (from the JPEG header, else through PIL);
    the memory check runs before anything is decoded. The files are then decoded in chunks
    of DECODE_CHUNK. Training keeps the whole images, since it crops them afresh every
    epoch; evaluation (crop_to=S) keeps only each image's eval_crop, all it ever reads.

    Args:
        images_path: image files (any format PIL reads; JPEGs take the fast path).
        images_class: their class indices.
        device: where images are decoded and kept.
        crop_to: None keeps (3, H, W) images; S keeps their (3, S, S) eval_crop.
        working_bytes: memory the loader needs beside the images, counted in the check.
        rank, world_size: keep only every world_size-th image, starting at rank (DDP).
        workers: CPU threads decoding on the CPU device (default: all cores).
        max_bytes: memory the images may take (default: memory_limit(device)).

    Attributes:
        images: on the device: a list of uint8 (3, H, W) whole images, or with crop_to=S one
            uint8 (N, 3, S, S) tensor of eval crops, which batches slice without a copy.
        labels: (N,) int64, on the device.
        sizes: (N, 2) int64 (H, W) of every file as decoded, on the CPU.

    Raises:
        DeviceMemoryError: the images would exceed max_bytes; nothing was decoded.
    """

    def __init__(self, images_path: Sequence[str | Path], images_class: Sequence[int], *,
                 device: str | torch.device = "cpu", crop_to: int | None = None,
                 working_bytes: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int | None = None, max_bytes: int | None = None) -> None:
        if len(images_path) != len(images_class):
            raise ValueError("images_path and images_class differ in length.")
        self.device = torch.device(device)
        self.crop_to = crop_to
        paths = [Path(p) for p in images_path][rank::world_size]
        self.labels = torch.as_tensor(list(images_class)[rank::world_size],
                                      dtype=torch.int64).to(self.device)
        # One thread: from the page cache a file takes ~25 us, and threads only fight over the
        # GIL here (measured slower with 2 to 16). decode_jpeg releases it; it gets threads.
        infos = [_probe(path) for path in paths]
        self.sizes = torch.tensor([(info.height, info.width) for info in infos],
                                  dtype=torch.int64).reshape(-1, 2)           # (N, 2) = (H, W)
        needed = self.estimate_bytes(self.sizes, crop_to) + working_bytes
        limit = memory_limit(self.device) if max_bytes is None else max_bytes
        if needed > limit:
            raise DeviceMemoryError(
                f"Keeping {len(paths)} decoded images on {self.device} needs about "
                f"{needed / 2**30:.2f} GiB, more than the {limit / 2**30:.2f} GiB allowed; "
                f"use the CPU DataLoader (--no-device-data) or a smaller data set.")
        self.images = self._decode(infos, paths, workers or os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def estimate_bytes(sizes: torch.Tensor, crop_to: int | None) -> int:
        """Device bytes the images of (H, W) `sizes` need, before decoding any."""
        if not len(sizes):
            return 0
        pixels = 3 * sizes[:, 0] * sizes[:, 1]
        if crop_to is None:
            return int(pixels.sum())
        largest = int(pixels.max())
        # The stored crops plus one decoded chunk and its float resize at a time.
        return 3 * crop_to * crop_to * len(sizes) + DECODE_CHUNK * largest + 8 * largest

    def _decode(self, infos: list[_FileInfo], paths: list[Path], workers: int
                ) -> list[torch.Tensor] | torch.Tensor:
        images: list[torch.Tensor] = []
        if self.crop_to is not None:
            crops = torch.empty(len(paths), 3, self.crop_to, self.crop_to, dtype=torch.uint8,
                                device=self.device)                          # (N, 3, S, S)
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
            # torchvision's decoders warn on every call that TorchCodec replaces them.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            for start in range(0, len(paths), DECODE_CHUNK):
                chunk = slice(start, start + DECODE_CHUNK)
                if self.device.type == "cuda":
                    decoded = _decode_on_cuda(infos[chunk], paths[chunk], self.device)
                else:
                    decoded = [image.to(self.device) for image in
                               pool.map(_decode_on_cpu, infos[chunk], paths[chunk])]
                for info in infos[chunk]:
                    info.data = bytearray()  # decoded: free the file's bytes
                if self.crop_to is None:
                    images.extend(decoded)
                else:
                    for k, image in enumerate(decoded, start):
                        crops[k] = eval_crop(image, self.crop_to)
        return images if self.crop_to is None else crops


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")


class _DeviceBatches:
    """What both loaders share: batches of (images, labels) on the device, and len()."""

    def __init__(self, images: DecodedImages, batch_size: int, drop_last: bool) -> None:
        _check_batch_size(batch_size)
        self.images = images
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_samples = len(images)
        self.normalise = Normalise(images.device)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class DeviceTrainLoader(_DeviceBatches):
    """Training batches: RandomResizedCrop + flip per image and epoch, shuffled every epoch.

    A drop-in for the training DataLoader in utils.train_one_epoch: iterate it for
    (images (B, 3, S, S) float32, labels (B,) int64) on the device; len() is the number of
    batches. Build it with from_files, or from whole DecodedImages.

    Args:
        images: whole decoded images (crop_to=None).
        img_size: side S of the square output.
        batch_size: images per batch (the last batch may be smaller unless drop_last).
        seed: seeds the order and augmentation; epoch e uses seed + e.
        drop_last: drop the last incomplete batch.
    """

    def __init__(self, images: DecodedImages, *, img_size: int, batch_size: int,
                 seed: int = 0, drop_last: bool = False) -> None:
        if images.crop_to is not None:
            raise ValueError("DeviceTrainLoader crops whole images; decode them with "
                             "crop_to=None.")
        super().__init__(images, batch_size, drop_last)
        self.img_size = img_size
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_files(cls, images_path: Sequence[str | Path], images_class: Sequence[int], *,
                   img_size: int, batch_size: int, seed: int = 0, drop_last: bool = False,
                   **decode_options) -> DeviceTrainLoader:
        """Decode the files (device, rank, world_size, workers, max_bytes: DecodedImages)."""
        _check_batch_size(batch_size)  # before the decoding, not after
        batch_bytes = 4 * 3 * img_size * img_size * batch_size * 3  # float batch, temporaries
        images = DecodedImages(images_path, images_class, working_bytes=batch_bytes,
                               **decode_options)
        return cls(images, img_size=img_size, batch_size=batch_size, seed=seed,
                   drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The order and, per image index, crop box and flip of `epoch` (CPU tensors)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        sizes = self.images.sizes
        top, left, height, width = crop_params(sizes[:, 0], sizes[:, 1], generator)
        flip = torch.rand(self.num_samples, generator=generator) < 0.5
        return dict(order=order, top=top, left=left, height=height, width=width, flip=flip)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        # Advance, so that a caller who never calls set_epoch still gets new epochs.
        self.epoch += 1
        plan = self.epoch_plan(epoch)
        # Python ints for the per-image loop: indexing CPU tensors costs microseconds each.
        order = plan["order"].tolist()
        top, left = plan["top"].tolist(), plan["left"].tolist()
        height, width = plan["height"].tolist(), plan["width"].tolist()
        device = self.images.device
        flips = plan["flip"].to(device)
        order_on_device = plan["order"].to(device)
        size = (self.img_size, self.img_size)
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            crops = [_resize(self.images.images[k][:, top[k]:top[k] + height[k],
                                                   left[k]:left[k] + width[k]], size)
                     for k in batch]
            images = torch.stack(crops)                                        # (B, 3, S, S)
            index = order_on_device[b * self.batch_size:b * self.batch_size + len(batch)]
            flip = flips[index].view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
            yield self.normalise(images.clamp_(0, 255)), self.images.labels[index]


class DeviceEvalLoader(_DeviceBatches):
    """Evaluation batches in file order, from eval crops computed once at decoding.

    A drop-in for the validation DataLoader in utils.evaluate; see DeviceTrainLoader.

    Args:
        images: images decoded with crop_to=S, the output side.
        batch_size: images per batch (the last batch may be smaller unless drop_last).
        drop_last: drop the last incomplete batch.
    """

    def __init__(self, images: DecodedImages, *, batch_size: int,
                 drop_last: bool = False) -> None:
        if images.crop_to is None:
            raise ValueError("DeviceEvalLoader reads eval crops; decode the images with "
                             "crop_to=img_size.")
        super().__init__(images, batch_size, drop_last)

    @classmethod
    def from_files(cls, images_path: Sequence[str | Path], images_class: Sequence[int], *,
                   img_size: int, batch_size: int, drop_last: bool = False,
                   **decode_options) -> DeviceEvalLoader:
        """Decode the files (device, rank, world_size, workers, max_bytes: DecodedImages)."""
        _check_batch_size(batch_size)
        images = DecodedImages(images_path, images_class, crop_to=img_size, **decode_options)
        return cls(images, batch_size=batch_size, drop_last=drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            images = self.images.images[rows].float()                       # (B, 3, S, S)
            yield self.normalise(images), self.images.labels[rows]
