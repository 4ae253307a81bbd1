"""device_data's decode-once images and its train and eval loaders on the CPU, against the PIL
pipeline of my_dataset."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from demo_data import draw_image
from device_data import (
    DecodedImages,
    DeviceEvalLoader,
    DeviceMemoryError,
    DeviceTrainLoader,
    Normalise,
    crop_params,
    jpeg_header,
)
from my_dataset import MEAN, STD, MyDataSet, build_transforms, open_rgb

# Measured on the CPU: at most one grey level from the PIL pipeline (torch's uint8 resize
# kernel rounds as PIL does; a few pixels in a thousand differ), 1/127.5 after Normalize.
ONE_LEVEL = 1.0 / 127.5 + 1e-5

# (size, PIL mode, format): the JPEG fast path, an upright JPEG, a PNG, a greyscale JPEG,
# a CMYK JPEG (PIL fallback) and one smaller than the 256 px eval resize (upsampled).
FILES = [((500, 375), "RGB", "JPEG"), ((375, 500), "RGB", "JPEG"), ((120, 90), "RGB", "PNG"),
         ((300, 200), "L", "JPEG"), ((240, 320), "CMYK", "JPEG"), ((200, 150), "RGB", "JPEG"),
         ((333, 500), "RGB", "JPEG")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[Path], list[int]]:
    root = tmp_path_factory.mktemp("device_data")
    paths, labels = [], []
    for i, (size, mode, fmt) in enumerate(FILES):
        drawing = draw_image("daisy", random.Random(i), 96).resize(size, Image.BICUBIC)
        noise = np.random.default_rng(i).integers(-20, 21, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(drawing, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        path = root / f"{i}.{fmt.lower()}"
        Image.fromarray(pixels).convert(mode).save(path, format=fmt, quality=75)
        paths.append(path)
        labels.append(i % 3)
    return paths, labels


def collect(loader: DeviceTrainLoader | DeviceEvalLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    assert len(batches) == len(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("img_size", [224, 64])
def test_eval_matches_pil_pipeline(images, img_size):
    """Both pipelines' eval tensors for the same files: at most one grey level apart.

    The resize rule (my_dataset.eval_resize_shape) and the normalisation (MEAN, STD) are
    shared, so what differs is only the resize implementation: torch's uint8 antialiased
    bilinear kernel against PIL's. Measured on these seven files (JPEG, PNG, greyscale,
    CMYK, smaller than the resize), a value differs by exactly one grey level at 0.1-0.2% of
    positions and agrees exactly (within float rounding of the normalisation) everywhere
    else; hence the bound of one level, and a mean far below it.
    """
    paths, labels = images
    loader = DeviceEvalLoader.from_files(paths, labels, img_size=img_size, batch_size=3)
    assert len(loader) == 3 and loader.num_samples == len(paths)
    x, y = collect(loader)
    assert x.shape == (len(paths), 3, img_size, img_size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels  # eval keeps the file order
    reference = MyDataSet(paths, labels, build_transforms(img_size, train=False))
    expected = torch.stack([reference[i][0] for i in range(len(paths))])
    diff = (x - expected).abs()
    assert diff.max() <= ONE_LEVEL, f"largest difference {diff.max() * 127.5:.2f} grey levels"
    assert diff.mean() < 0.3 / 127.5  # most pixels agree exactly
    assert list(loader) and torch.equal(collect(loader)[0], x)  # the same every time


def test_train_batches_shape_range_and_labels(images):
    paths, labels = images
    loader = DeviceTrainLoader.from_files(paths, labels, img_size=64, batch_size=4, seed=1)
    assert len(loader) == 2
    x, y = collect(loader)
    assert x.shape == (len(paths), 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1
    order = loader.epoch_plan(0)["order"].tolist()
    assert sorted(order) == list(range(len(paths)))  # every sample once per epoch
    assert y.tolist() == [labels[k] for k in order]
    dropped = DeviceTrainLoader.from_files(paths, labels, img_size=64, batch_size=4,
                                           drop_last=True)
    assert len(dropped) == 1 and collect(dropped)[0].shape[0] == 4


def test_train_epochs_are_seeded(images):
    paths, labels = images
    make = lambda seed: DeviceTrainLoader.from_files(  # noqa: E731
        paths, labels, img_size=64, batch_size=4, seed=seed)
    first, second = make(0), make(0)
    first.set_epoch(3)
    second.set_epoch(3)
    x3, y3 = collect(first)
    assert torch.equal(x3, collect(second)[0])        # same seed and epoch: same batches
    first.set_epoch(3)
    assert torch.equal(x3, collect(first)[0])         # a resumed run repeats the epoch
    x4, y4 = collect(first)                           # no set_epoch: the next epoch
    assert not torch.equal(x3, x4)
    assert sorted(y3.tolist()) == sorted(y4.tolist()) == sorted(labels)
    other = make(5)
    other.set_epoch(3)
    assert not torch.equal(x3, collect(other)[0])


def test_train_crops_match_pil_resized_crop(images):
    """Each sample is the PIL crop + resize + flip of the planned box, within a grey level."""
    paths, labels = images
    loader = DeviceTrainLoader.from_files(paths, labels, img_size=64, batch_size=len(paths),
                                          seed=7)
    flips = set()
    for epoch in range(3):  # a few epochs, so that both flip states occur
        plan = loader.epoch_plan(epoch)
        flips.update(plan["flip"].tolist())
        loader.set_epoch(epoch)
        x, _ = collect(loader)
        for position, k in enumerate(plan["order"].tolist()):
            box = [int(plan[name][k]) for name in ("top", "left", "height", "width")]
            crop = TF.resized_crop(open_rgb(paths[k]), *box, [64, 64])
            if plan["flip"][k]:
                crop = TF.hflip(crop)
            expected = TF.normalize(TF.to_tensor(crop), MEAN, STD)
            assert (x[position] - expected).abs().max() <= ONE_LEVEL, (paths[k].name, box)
    assert flips == {True, False}


def test_crop_params_follow_torchvision():
    """Same bounds and distribution as RandomResizedCrop.get_params (scale 0.08-1, 3/4-4/3)."""
    n, height, width = 20000, 375, 500
    top, left, h, w = crop_params(torch.full((n,), height), torch.full((n,), width),
                                  torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all() and (h > 0).all()
    area = (h * w).double() / (height * width)
    assert area.min() >= 0.079 and area.max() <= 1.0
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    reference = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)], dtype=torch.float64)
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    # Means of 20000 draws: standard errors are about 0.002 (area) and 0.0015 (log ratio).
    assert abs(area.mean() - ref_area.mean()) < 0.01
    log_ratio = (w.double() / h).log().mean()
    ref_log_ratio = (reference[:, 3] / reference[:, 2]).log().mean()
    assert abs(log_ratio - ref_log_ratio) < 0.01
    # A strip far outside the ratio range always falls back to the central crop.
    top, left, h, w = crop_params(torch.full((50,), 10), torch.full((50,), 400),
                                  torch.Generator().manual_seed(1))
    assert (h == 10).all() and (w == 13).all() and (left == (400 - 13) // 2).all()


@pytest.mark.parametrize("options", [
    dict(mode="RGB"), dict(mode="L"), dict(mode="CMYK"), dict(mode="RGB", progressive=True),
    dict(mode="RGB", exif=b"Exif\x00\x00" + bytes(3000), subsampling=0),
    dict(mode="RGB", icc_profile=bytes(70_000))])  # an ICC profile spans several segments
def test_jpeg_header_agrees_with_pil(tmp_path, options):
    path = tmp_path / "x.jpg"
    mode = options.pop("mode")
    Image.new("RGB", (123, 45), (200, 30, 90)).convert(mode).save(path, quality=80, **options)
    data = path.read_bytes()
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    assert jpeg_header(data) == (8, 45, 123, channels)
    assert jpeg_header(b"\x89PNG\r\n\x1a\n" + data) is None
    assert jpeg_header(data[:20]) is None  # cut before the frame header


def test_shards_split_the_images(images):
    paths, labels = images
    shards = [DeviceEvalLoader.from_files(paths, labels, img_size=32, batch_size=2,
                                          rank=rank, world_size=2) for rank in range(2)]
    assert [s.num_samples for s in shards] == [4, 3]
    assert collect(shards[1])[1].tolist() == labels[1::2]


def test_too_large_raises_before_decoding(images):
    paths, labels = images
    with pytest.raises(DeviceMemoryError, match="no-device-data"):
        DeviceTrainLoader.from_files(paths, labels, img_size=64, batch_size=2, max_bytes=1000)
    with pytest.raises(DeviceMemoryError, match="no-device-data"):
        DeviceEvalLoader.from_files(paths, labels, img_size=64, batch_size=2, max_bytes=1000)
    with pytest.raises(ValueError, match="differ in length"):
        DeviceTrainLoader.from_files(paths, labels[:-1], img_size=64, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceEvalLoader.from_files(paths, labels, img_size=64, batch_size=0)


def test_decoded_once_serves_several_loaders(images):
    """The decode-once part keeps every file's image and size; loaders only read it."""
    paths, labels = images
    whole = DecodedImages(paths, labels)
    assert len(whole) == len(paths) and whole.labels.tolist() == labels
    for image, (height, width), path in zip(whole.images, whole.sizes.tolist(), paths,
                                            strict=True):
        assert image.dtype == torch.uint8 and image.shape == (3, height, width)
        assert Image.open(path).size == (width, height)
    first = DeviceTrainLoader(whole, img_size=32, batch_size=4, seed=2)
    second = DeviceTrainLoader(whole, img_size=32, batch_size=4, seed=2)
    assert torch.equal(collect(first)[0], collect(second)[0])
    with pytest.raises(ValueError, match="crop_to"):
        DeviceEvalLoader(whole, batch_size=4)

    crops = DecodedImages(paths, labels, crop_to=32)
    # One (N, 3, S, S) tensor, which the eval loader's batches slice instead of stacking.
    assert crops.images.dtype == torch.uint8 and crops.images.shape == (len(paths), 3, 32, 32)
    loader = DeviceEvalLoader(crops, batch_size=4)
    first = collect(loader)[0]
    assert first.shape == (len(paths), 3, 32, 32)
    assert torch.equal(first, collect(loader)[0])  # normalising in place leaves the crops be
    with pytest.raises(ValueError, match="crop_to"):
        DeviceTrainLoader(crops, img_size=32, batch_size=4)


def test_normalise_is_to_tensor_then_my_datasets_normalize(images):
    """Normalise derives from MEAN and STD: the same tensor as ToTensor + Normalize."""
    image = open_rgb(images[0][0])
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
    ours = Normalise("cpu")(pixels[None].clone())[0]
    expected = TF.normalize(TF.to_tensor(image), MEAN, STD)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
