"""A data pipeline that lives on the training device: decode once, augment tensors there.

The PIL pipeline (my_dataset.MyDataSet in a DataLoader) decodes every JPEG again in every
epoch on the CPU; on a fast GPU a frozen-backbone ViT-B/16 epoch is then bound by JPEG
decoding (REFERENCE.md, "Throughput of the peers"). DeviceImageLoader instead

1. reads every file's bytes once and decodes the JPEGs in batches with
   ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA; libjpeg-turbo in a
   thread pool on the CPU); files decode_jpeg does not take (PNG, CMYK JPEGs, ...) go
   through my_dataset.open_rgb, so every image becomes 8-bit RGB as in MyDataSet;
2. keeps the decoded images as (3, H, W) uint8 tensors on the device (about 2 GB for the
   3670 flower_photos images);
3. for evaluation, computes the report's Resize(round(S*256/224)) + CenterCrop(S) once and
   serves slices of one (N, 3, S, S) uint8 tensor;
4. for training, draws RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) and
   RandomHorizontalFlip(0.5) per image and epoch from a seeded CPU generator, then crops
   and resizes each image on the device.

Batches are (images (B, 3, S, S) float32 in [-1, 1], labels (B,) int64), both already on
the device, normalised with mean = std = 0.5 as build_transforms does.

Differences from the PIL pipeline (measured in tests/test_device_data.py):
- Resizing is torch's bilinear interpolation with antialias=True, the same triangle filter
  as PIL's BILINEAR resize. On the CPU torch's uint8 kernel rounds as PIL does; on CUDA it
  runs in float32 (eval images are rounded once to uint8, training crops not at all). On the
  CPU, outputs differ from the PIL pipeline's by at most one grey level (tests measure it).
- On CUDA, nvJPEG decodes: its IDCT and chroma upsampling differ from libjpeg-turbo's (which
  PIL and the CPU path use). Measured on an H200 (torchvision 0.26) on noisy 500x375 JPEGs:
  outputs differ from the CPU path's by 0.2-0.4 grey levels on average and by up to 10 at
  single pixels; files PIL decodes on both paths (PNG, CMYK) by at most one.
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

from my_dataset import open_rgb, to_rgb

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


def eval_resize_size(height: int, width: int, img_size: int) -> tuple[int, int]:
    """(h, w) after the report's Resize(round(S*256/224)) of the shorter side, as torchvision."""
    short_target = int(round(img_size * 256 / 224))
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_target, int(short_target * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


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


class DeviceImageLoader:
    """Batches of decoded, augmented images that never leave the device.

    A drop-in for a DataLoader in utils.train_one_epoch / evaluate: iterate it for
    (images, labels) batches; len() is the number of batches.

    Args:
        images_path: image files (any format PIL reads; JPEGs take the fast path).
        images_class: their class indices.
        img_size: side S of the square output.
        batch_size: images per batch (the last batch may be smaller unless drop_last).
        train: True: RandomResizedCrop + flip, shuffled each epoch. False: Resize +
            CenterCrop computed once, fixed order.
        device: where images are decoded, kept and augmented.
        seed: seeds the order and augmentation; epoch e uses seed + e.
        drop_last: drop the last incomplete batch.
        rank, world_size: keep only every world_size-th image, starting at rank (DDP).
        workers: CPU threads decoding on the CPU device (default: all cores).
        max_bytes: memory the decoded images may take (default: memory_limit(device)).

    Raises:
        DeviceMemoryError: the decoded images would exceed max_bytes; nothing was decoded.
    """

    def __init__(self, images_path: Sequence[str | Path], images_class: Sequence[int], *,
                 img_size: int, batch_size: int, train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, workers: int | None = None,
                 max_bytes: int | None = None) -> None:
        if len(images_path) != len(images_class):
            raise ValueError("images_path and images_class differ in length.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.device = torch.device(device)
        self.img_size = img_size
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        paths = [Path(p) for p in images_path][rank::world_size]
        self.labels = torch.as_tensor(list(images_class)[rank::world_size],
                                      dtype=torch.int64).to(self.device)
        self.num_samples = len(paths)
        workers = workers or os.cpu_count() or 1

        # One thread: from the page cache a file takes ~25 us, and threads only fight over the
        # GIL here (measured slower with 2 to 16). decode_jpeg releases it; it gets threads.
        infos = [_probe(path) for path in paths]
        self.sizes = torch.tensor([(info.height, info.width) for info in infos],
                                  dtype=torch.int64).reshape(-1, 2)           # (N, 2) = (H, W)
        needed = self.estimate_bytes(self.sizes, img_size, batch_size, train)
        limit = memory_limit(self.device) if max_bytes is None else max_bytes
        if needed > limit:
            raise DeviceMemoryError(
                f"Keeping {self.num_samples} decoded images on {self.device} needs about "
                f"{needed / 2**30:.2f} GiB, more than the {limit / 2**30:.2f} GiB allowed; "
                f"use the CPU DataLoader (--no-device-data) or a smaller data set.")

        self.images: list[torch.Tensor] = []    # train: (3, H, W) uint8 each
        self.eval_images: torch.Tensor | None = None  # eval: (N, 3, S, S) uint8
        if not train:
            self.eval_images = torch.empty((self.num_samples, 3, img_size, img_size),
                                           dtype=torch.uint8, device=self.device)
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, on every call.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            for start in range(0, self.num_samples, DECODE_CHUNK):
                chunk = slice(start, start + DECODE_CHUNK)
                if self.device.type == "cuda":
                    decoded = _decode_on_cuda(infos[chunk], paths[chunk], self.device)
                else:
                    decoded = list(pool.map(_decode_on_cpu, infos[chunk], paths[chunk]))
                    decoded = [image.to(self.device) for image in decoded]
                for info in infos[chunk]:
                    info.data = bytearray()  # decoded: free the file's bytes
                if train:
                    self.images.extend(decoded)
                else:
                    for k, image in enumerate(decoded, start=start):
                        self.eval_images[k] = self._eval_transform(image)

    @staticmethod
    def estimate_bytes(sizes: torch.Tensor, img_size: int, batch_size: int, train: bool) -> int:
        """Device bytes needed for images of (H, W) `sizes`, before decoding any."""
        per_output = 3 * img_size * img_size
        if train:
            decoded = int((3 * sizes[:, 0] * sizes[:, 1]).sum()) if len(sizes) else 0
            return decoded + 4 * per_output * batch_size * 3  # float batch and temporaries
        largest = int((3 * sizes[:, 0] * sizes[:, 1]).max()) if len(sizes) else 0
        # The stored crops plus one decoded chunk and its float resize at a time.
        return per_output * len(sizes) + DECODE_CHUNK * largest + 8 * largest

    def _eval_transform(self, image: torch.Tensor) -> torch.Tensor:
        """Resize(round(S*256/224)) + CenterCrop(S), rounded back to uint8: (3, S, S)."""
        size = self.img_size
        height, width = image.shape[-2:]
        new_h, new_w = eval_resize_size(height, width, size)
        # The shorter side becomes round(S*256/224) >= S, so CenterCrop never has to pad.
        resized = _resize(image, (new_h, new_w))
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        crop = resized[:, top:top + size, left:left + size]
        return crop.round_().clamp_(0, 255).to(torch.uint8)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The order and, per image index, crop box and flip of `epoch` (CPU tensors)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        top, left, height, width = crop_params(self.sizes[:, 0], self.sizes[:, 1], generator)
        flip = torch.rand(self.num_samples, generator=generator) < 0.5
        return dict(order=order, top=top, left=left, height=height, width=width, flip=flip)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            epoch = self.epoch
            # Advance, so that a caller who never calls set_epoch still gets new epochs.
            self.epoch += 1
            yield from self._train_batches(epoch)
        else:
            yield from self._eval_batches()

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self.eval_images is not None
        for b in range(len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield _normalise(self.eval_images[rows].float()), self.labels[rows]

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.epoch_plan(epoch)
        # Python ints for the per-image loop: indexing CPU tensors costs microseconds each.
        order = plan["order"].tolist()
        top, left = plan["top"].tolist(), plan["left"].tolist()
        height, width = plan["height"].tolist(), plan["width"].tolist()
        flips = plan["flip"].to(self.device)
        order_on_device = plan["order"].to(self.device)
        size = (self.img_size, self.img_size)
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            crops = [_resize(self.images[k][:, top[k]:top[k] + height[k],
                                            left[k]:left[k] + width[k]], size)
                     for k in batch]
            images = torch.stack(crops)                                        # (B, 3, S, S)
            index = order_on_device[b * self.batch_size:b * self.batch_size + len(batch)]
            flip = flips[index].view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
            yield _normalise(images.clamp_(0, 255)), self.labels[index]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1]: ToTensor's /255, then Normalize(mean=0.5, std=0.5)."""
    return images.div_(127.5).sub_(1.0)
