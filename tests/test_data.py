"""The split (utils.read_split_data), the image reader and data set (my_dataset), demo_data."""

from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from demo_data import CLASSES, make_demo_flowers
from download import FLOWER_CLASS_COUNTS as FLOWER_COUNTS
from my_dataset import (
    MyDataSet,
    build_transforms,
    check_image,
    eval_resize_shape,
    eval_resize_size,
    open_rgb,
    to_rgb,
)
from utils import Split, UserError, read_split_data


def write_tree(root: Path, counts: dict[str, int], data: bytes, suffix: str = ".jpg") -> Path:
    """root/<class>/<name><suffix> with `data` as every file's bytes."""
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            # Names whose sorted order is not the order they were written in.
            (folder / f"{(i * 7919) % 10007:05d}_{i}{suffix}").write_bytes(data)
    return root


def noise_jpeg(size: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def flower_tree(tmp_path_factory, jpeg_bytes) -> Path:
    """flower_photos' layout and class sizes (3670 files), tiny JPEGs, plus its LICENSE.txt."""
    root = write_tree(tmp_path_factory.mktemp("flowers") / "flower_photos", FLOWER_COUNTS,
                      jpeg_bytes)
    (root / "LICENSE.txt").write_text("All images are licensed under CC-BY.\n")
    return root


@pytest.fixture(scope="module")
def flower_split(flower_tree) -> Split:
    return read_split_data(flower_tree)


def reference_val_set(root: Path, val_rate: float = 0.2) -> set[Path]:
    """The reproduced repository's draw: random.seed(0), sorted classes, sorted files,
    random.sample per class. Runs on the global generator, restored afterwards."""
    state = random.getstate()
    try:
        random.seed(0)
        chosen: set[Path] = set()
        classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
        for name in classes:
            files = sorted(os.path.join(root, name, f) for f in os.listdir(root / name))
            chosen.update(Path(p) for p in random.sample(files, k=int(len(files) * val_rate)))
        return chosen
    finally:
        random.setstate(state)


# --------------------------------------------------------------------------- the split

def test_flower_photos_sizes_split_2939_731(flower_split):
    split = flower_split
    assert split.class_names == sorted(FLOWER_COUNTS)
    assert split.num_images == 3670
    assert len(split.train_images) == 2939 and len(split.val_images) == 731
    assert len(split.train_labels) == 2939 and len(split.val_labels) == 731
    assert split.skipped == []
    for label, name in enumerate(split.class_names):
        assert split.val_labels.count(label) == int(FLOWER_COUNTS[name] * 0.2)
        assert split.train_labels.count(label) == FLOWER_COUNTS[name] - int(
            FLOWER_COUNTS[name] * 0.2)
    for path, label in zip(split.train_images + split.val_images,
                           split.train_labels + split.val_labels, strict=True):
        assert Path(path).parent.name == split.class_names[label]
    assert not set(split.train_images) & set(split.val_images)


def test_split_matches_the_reproduced_repository_exactly(flower_tree, flower_split):
    expected = reference_val_set(flower_tree)
    assert len(expected) == 731
    assert {Path(p) for p in flower_split.val_images} == expected


def test_split_is_deterministic_and_depends_on_the_seed(flower_tree, flower_split):
    again = read_split_data(flower_tree)
    assert again.val_images == flower_split.val_images
    assert again.train_images == flower_split.train_images
    other = read_split_data(flower_tree, seed=1, verify=False)
    assert len(other.val_images) == 731
    assert set(other.val_images) != set(flower_split.val_images)


def test_split_leaves_the_global_random_state_alone(flower_tree):
    random.seed(1234)
    state = random.getstate()
    read_split_data(flower_tree, verify=False)
    assert random.getstate() == state


def test_split_writes_nothing_to_the_working_directory(flower_tree, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    read_split_data(flower_tree)
    assert list(cwd.iterdir()) == []


def test_extensions_are_case_insensitive_and_stray_files_ignored(tmp_path, jpeg_bytes,
                                                                 png_bytes):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    files = {"a/one.JPG": jpeg_bytes, "a/two.jpeg": jpeg_bytes, "a/three.Jpg": jpeg_bytes,
             "a/four.PNG": png_bytes, "a/five.jpg": jpeg_bytes,
             "b/six.png": png_bytes, "b/seven.JPEG": jpeg_bytes}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    # Not images, or not where images go: all ignored without a word.
    (root / "LICENSE.txt").write_text("licence")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "a" / "._five.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "a" / "nested").mkdir()
    (root / "a" / "nested" / "deep.jpg").write_bytes(jpeg_bytes)
    (root / "b" / "folder.jpg").mkdir()  # a folder with an image's name
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.jpg").write_bytes(jpeg_bytes)

    messages: list[str] = []
    split = read_split_data(root, warn=messages.append)
    assert messages == []
    assert split.skipped == []
    assert split.class_names == ["a", "b"]
    found = {p.relative_to(root).as_posix() for p in split.train_images + split.val_images}
    assert found == set(files)
    assert split.val_labels.count(0) == 1 and split.val_labels.count(1) == 0


def test_unreadable_files_are_named_skipped_and_listed(tmp_path, jpeg_bytes):
    root = write_tree(tmp_path / "data", {"a": 5, "b": 5}, jpeg_bytes)
    good = noise_jpeg()
    bad = {
        root / "a" / "truncated.jpg": good[: len(good) // 2],
        root / "a" / "empty.jpg": b"",
        root / "b" / "text.jpg": b"this is not a JPEG\n",
        root / "b" / "random.png": np.random.default_rng(0).bytes(300),
    }
    for path, data in bad.items():
        path.write_bytes(data)

    messages: list[str] = []
    split = read_split_data(root, warn=messages.append)
    for path in bad:
        lines = [m for m in messages if str(path) in m]
        assert len(lines) == 1, (path, messages)
        assert "\n" not in lines[0]
    assert {Path(p) for p, _ in split.skipped} == set(bad)
    assert all(why for _, why in split.skipped)
    used = set(split.train_images) | set(split.val_images)
    assert not used & set(bad)
    assert len(split.train_images) == 8 and len(split.val_images) == 2


def test_unreadable_files_warn_through_print_by_default(tmp_path, jpeg_bytes, capsys):
    root = write_tree(tmp_path / "data", {"a": 2}, jpeg_bytes)
    (root / "a" / "empty.jpg").write_bytes(b"")
    split = read_split_data(root)
    out = capsys.readouterr()
    assert "empty.jpg" in out.out + out.err
    assert len(split.skipped) == 1


def test_split_errors_are_user_errors(tmp_path, jpeg_bytes):
    with pytest.raises(UserError, match="does not exist"):
        read_split_data(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(jpeg_bytes)
    with pytest.raises(UserError, match="class folders"):
        read_split_data(tmp_path / "flat")
    (tmp_path / "empty" / "daisy").mkdir(parents=True)
    (tmp_path / "empty" / "daisy" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match="No readable images"):
        read_split_data(tmp_path / "empty")


def test_check_image_accepts_good_and_names_the_problem_of_bad(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(noise_jpeg())
    assert check_image(good) is None
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(noise_jpeg()[:1500])
    assert "truncated" in check_image(truncated)


# --------------------------------------------------------------------------- image modes

def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _make_l(tmp):
    img = Image.new("L", (2, 2), 100)
    img.putpixel((1, 1), 250)
    return _save(img, tmp / "l.png"), {(0, 0): (100,) * 3, (1, 1): (250,) * 3}


def _make_la(tmp):
    img = Image.new("LA", (2, 2), (100, 255))
    img.putpixel((1, 1), (0, 0))  # fully transparent black: shown on white
    return _save(img, tmp / "la.png"), {(0, 0): (100,) * 3, (1, 1): (255,) * 3}


def _make_1(tmp):
    img = Image.new("1", (2, 2), 0)
    img.putpixel((1, 1), 1)
    return _save(img, tmp / "bw.png"), {(0, 0): (0, 0, 0), (1, 1): (255, 255, 255)}


def _palette(transparent: bool, path: Path) -> Path:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    return _save(img, path, **({"transparency": 0} if transparent else {}))


def _make_p(tmp):
    return _palette(False, tmp / "p.png"), {(0, 0): (255, 0, 0), (1, 1): (0, 0, 255)}


def _make_p_transparent(tmp):
    return _palette(True, tmp / "pt.png"), {(0, 0): (255, 255, 255), (1, 1): (0, 0, 255)}


def _make_p_gif(tmp):
    return _palette(True, tmp / "pt.gif"), {(0, 0): (255, 255, 255), (1, 1): (0, 0, 255)}


def _make_rgba(tmp):
    img = Image.new("RGBA", (2, 2), (0, 255, 0, 255))
    img.putpixel((1, 1), (255, 0, 0, 0))
    img.putpixel((0, 1), (0, 0, 0, 128))
    return _save(img, tmp / "rgba.png"), {(0, 0): (0, 255, 0), (1, 1): (255, 255, 255),
                                          (0, 1): (127, 127, 127)}


def _make_cmyk_tiff(tmp):
    img = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 0))
    return _save(img, tmp / "cmyk.tif"), {(0, 0): (255, 255, 255), (1, 1): (0, 255, 255)}


def _make_cmyk_jpeg(tmp):
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # JPEG is lossy: one flat colour
    return _save(img, tmp / "cmyk.jpg", quality=95), {(8, 8): (0, 255, 255)}


def _make_i16(tmp):
    values = np.array([[65535, 0], [32768, 255]], dtype=np.uint16)
    return _save(Image.fromarray(values), tmp / "i16.png"), {
        (0, 0): (255,) * 3, (1, 0): (0,) * 3, (0, 1): (128,) * 3, (1, 1): (1,) * 3}


def _make_i16_dark(tmp):
    # A dark 16-bit image: 200 / 65535 of full scale is black, not 200 / 255.
    values = np.array([[200, 0], [100, 50]], dtype=np.uint16)
    return _save(Image.fromarray(values), tmp / "dark16.png"), {(0, 0): (1,) * 3,
                                                                 (1, 0): (0,) * 3}


def _make_i32(tmp):
    values = np.array([[65535, 0], [32768, 0]], dtype=np.int32)
    return _save(Image.fromarray(values), tmp / "i32.tif"), {(0, 0): (255,) * 3,
                                                              (1, 0): (0,) * 3,
                                                              (0, 1): (128,) * 3}


def _make_f(tmp):
    values = np.array([[0.0, 1.0], [0.25, 0.75]], dtype=np.float32)
    return _save(Image.fromarray(values), tmp / "f.tif"), {(0, 0): (0,) * 3,
                                                            (1, 0): (255,) * 3}


MODES = {"L": _make_l, "LA": _make_la, "1": _make_1, "P": _make_p,
         "P+transparency": _make_p_transparent, "P+transparency GIF": _make_p_gif,
         "RGBA": _make_rgba, "CMYK TIFF": _make_cmyk_tiff, "CMYK JPEG": _make_cmyk_jpeg,
         "I;16": _make_i16, "I;16 dark": _make_i16_dark, "I": _make_i32, "F": _make_f}
SOURCE_MODE = {"P+transparency GIF": "P", "CMYK TIFF": "CMYK", "CMYK JPEG": "CMYK",
               "I;16 dark": "I;16", "P+transparency": "P"}


@pytest.mark.parametrize("case", list(MODES))
def test_every_image_mode_becomes_sensible_rgb(case, tmp_path):
    path, expected = MODES[case](tmp_path)
    with Image.open(path) as original:
        assert original.mode == SOURCE_MODE.get(case, case)  # the file really is that mode
        size = original.size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        img = open_rgb(path)
    assert img.mode == "RGB" and img.size == size
    assert check_image(path) is None
    tolerance = 6 if path.suffix == ".jpg" else 1
    for xy, rgb in expected.items():
        actual = img.getpixel(xy)
        assert all(abs(a - e) <= tolerance for a, e in zip(actual, rgb, strict=True)), (
            case, xy, actual, rgb)


def test_to_rgb_keeps_rgb_and_converts_in_memory_images():
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(rgb).getpixel((2, 1)) == (1, 2, 3)
    ramp = Image.fromarray(np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4))
    out = np.asarray(to_rgb(ramp))[..., 0].ravel()
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out.astype(int)) >= 0).all()  # monotone: no wrap-around or clipping


# --------------------------------------------------------------------------- data set, transforms

def test_my_dataset_returns_normalised_3xhxw_tensors(tmp_path):
    white = _save(Image.new("RGB", (50, 30), (255, 255, 255)), tmp_path / "white.jpg",
                  quality=100)
    black_grey = _save(Image.new("L", (30, 70), 0), tmp_path / "black.png")
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(noise_jpeg(80))
    data = MyDataSet([white, black_grey, noise], [3, 1, 0], build_transforms(64, train=False))
    assert len(data) == 3
    for index, label in enumerate([3, 1, 0]):
        tensor, target = data[index]
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tensor.shape == (3, 64, 64)
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
        assert target == label
    torch.testing.assert_close(data[0][0], torch.ones(3, 64, 64), atol=0.02, rtol=0)
    torch.testing.assert_close(data[1][0], -torch.ones(3, 64, 64), atol=0, rtol=0)
    assert data[2][0].min() < -0.5 and data[2][0].max() > 0.5

    train_data = MyDataSet([noise], [0], build_transforms(64, train=True))
    assert train_data[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError):
        MyDataSet([white], [0, 1])


@pytest.mark.parametrize("img_size", [224, 64])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(500, 375), (100, 300), (30, 20)])
def test_transforms_give_exact_crops(img_size, train, size):
    img = Image.new("RGB", size, (10, 20, 30))
    out = build_transforms(img_size, train=train)(img)
    assert out.shape == (3, img_size, img_size)
    expected = torch.tensor([10, 20, 30]).view(3, 1, 1) / 255 * 2 - 1
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-3, rtol=0)


def test_eval_transform_is_resize_256_center_crop_224():
    # A 512 px image with a 40 px black border: Resize(256) halves it to 20 px, and
    # CenterCrop(224) cuts 16 of them, leaving 4. (No resize would leave none, Resize(224)
    # about 17.)
    img = Image.new("RGB", (512, 512), (0, 0, 0))
    img.paste((255, 255, 255), (40, 40, 472, 472))
    out = build_transforms(224, train=False)(img)
    assert out.shape == (3, 224, 224)
    row = out[0, 112]
    dark_left = int((row[:20] < 0).sum())
    dark_right = int((row[-20:] < 0).sum())
    assert 3 <= dark_left <= 5 and 3 <= dark_right <= 5
    assert out[:, 10:-10, 10:-10].min() > 0.95


@pytest.mark.parametrize(("img_size", "short_side"), [(224, 256), (384, 439), (64, 73)])
def test_eval_resize_rule_and_the_shapes_torchvision_gives(img_size, short_side):
    """eval_resize_shape, which pipelines resizing on their own use, is torchvision's Resize."""
    assert eval_resize_size(img_size) == short_side
    resize = transforms.Resize(short_side)
    for width, height in [(500, 375), (375, 500), (333, 500), (300, 300), (20, 30), (1001, 7)]:
        resized = resize(Image.new("RGB", (width, height)))
        assert eval_resize_shape(height, width, img_size) == (resized.height, resized.width)


def test_collate_fn_stacks_images_and_makes_labels_a_tensor(tmp_path):
    paths = [_save(Image.new("RGB", (40 + 10 * i, 40), (20 * i, 0, 0)), tmp_path / f"{i}.png")
             for i in range(3)]
    data = MyDataSet(paths, [4, 0, 2], build_transforms(32, train=False))
    images, labels = MyDataSet.collate_fn([data[i] for i in range(3)])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [4, 0, 2]
    torch.testing.assert_close(images[1], data[1][0])
    # As the reproduced train.py passes it: the instance's collate_fn, in a DataLoader.
    loader = DataLoader(data, batch_size=2, collate_fn=data.collate_fn)
    assert [tuple(x.shape) for x, _ in loader] == [(2, 3, 32, 32), (1, 3, 32, 32)]


# --------------------------------------------------------------------------- demo data

def test_demo_flowers_are_deterministic(tmp_path):
    first = make_demo_flowers(tmp_path / "one", per_class=3)
    second = make_demo_flowers(tmp_path / "two", per_class=3)
    assert sorted(p.name for p in first.iterdir()) == sorted(CLASSES)
    assert len(CLASSES) == 5
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 15
    assert all(p.suffix == ".jpg" for p in files)
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    assert sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file()) == files
    with Image.open(first / files[0]) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
    other = make_demo_flowers(tmp_path / "three", per_class=3, seed=1)
    assert (other / files[0]).read_bytes() != (first / files[0]).read_bytes()


def test_demo_flowers_split_like_a_real_tree(demo_flowers):
    split = read_split_data(demo_flowers)
    assert split.class_names == list(CLASSES)
    assert split.num_images == 60 and len(split.val_images) == 10
    assert split.skipped == []


# --------------------------------------------------------------------------- augmentation seen
# on images where a crop or a flip shows, and every image format in the split

def gradient_image(width: int = 120, height: int = 90) -> Image.Image:
    """Red rises left to right, green top to bottom: any crop or flip changes the pixels."""
    x = torch.linspace(0, 255, width).round().to(torch.uint8)
    y = torch.linspace(0, 255, height).round().to(torch.uint8)
    pixels = torch.stack([x.expand(height, width), y[:, None].expand(height, width),
                          torch.full((height, width), 128, dtype=torch.uint8)], dim=-1)
    return Image.fromarray(pixels.numpy())


def test_training_transform_is_the_reproduced_random_resized_crop_then_flip():
    image = gradient_image()
    reference = transforms.Compose([  # the reproduced repository's data_transform["train"]
        transforms.RandomResizedCrop(64), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
    ours = build_transforms(64, train=True)
    outputs = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = ours(image)
        torch.manual_seed(seed)
        assert torch.equal(out, reference(image)), seed
        outputs.append(out)
    assert len({tuple(o[:, 0, 0].tolist()) for o in outputs}) > 6  # crops differ per draw


def test_training_transform_flips_about_half_the_images_and_evaluation_never():
    image = gradient_image()
    train_transform, eval_transform = build_transforms(64, True), build_transforms(64, False)
    torch.manual_seed(0)
    rising = []
    for _ in range(40):
        red = train_transform(image)[0].mean(dim=0)  # red along x
        rising.append(bool(red[-1] > red[0]))
    assert 8 <= sum(rising) <= 32  # flipped (red falling) and not flipped both occur
    red = eval_transform(image)[0].mean(dim=0)
    assert red[-1] > red[0] and torch.equal(eval_transform(image), eval_transform(image))


def test_bmp_webp_gif_and_tif_images_are_found_by_the_split(tmp_path):
    root = tmp_path / "data"
    suffixes = (".bmp", ".webp", ".gif", ".tif", ".tiff", ".jpg")
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i, suffix in enumerate(suffixes):
            gradient_image(20, 20).save(root / name / f"{i}{suffix}")
    split = read_split_data(root, val_rate=0.5, warn=pytest.fail)
    found = sorted(p.name for p in split.train_images + split.val_images)
    assert found == sorted([f"{i}{s}" for i, s in enumerate(suffixes)] * 2)
    assert split.skipped == []


def _phone_photo(path: Path, orientation: int) -> Image.Image:
    """An upright picture (red on the left) stored turned, with the EXIF Orientation that
    tells a viewer how to turn it back; returns the upright picture."""
    upright = Image.new("RGB", (48, 32), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 16, 32))
    store = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(store).save(path, quality=95, exif=exif)
    return upright


@pytest.mark.parametrize("orientation", [6, 8])
def test_open_rgb_turns_a_phone_photo_upright_only_when_asked(tmp_path, orientation):
    photo = tmp_path / "phone.jpg"
    upright = _phone_photo(photo, orientation)
    turned = open_rgb(photo, exif_transpose=True)
    assert turned.size == upright.size
    pixels = np.asarray(turned, dtype=np.int16)
    assert pixels[:, :12, 0].mean() > 200 and pixels[:, -12:, 0].mean() < 50  # red left
    assert open_rgb(photo).size == (32, 48)  # the reproduced behaviour: as stored


def test_dataset_keeps_the_stored_orientation_by_default(tmp_path):
    photo = tmp_path / "phone.jpg"
    _phone_photo(photo, 6)
    to_tensor = transforms.ToTensor()
    as_stored = MyDataSet([photo], [0], to_tensor)[0][0]
    upright = MyDataSet([photo], [0], to_tensor, exif_transpose=True)[0][0]
    assert as_stored.shape == (3, 48, 32) and upright.shape == (3, 32, 48)


def test_train_exif_transpose_flag_defaults_to_the_reproduced_behaviour():
    import train

    parser = train.get_args_parser()
    assert parser.parse_args([]).exif_transpose is False
    assert parser.parse_args(["--exif-transpose"]).exif_transpose is True


@pytest.mark.parametrize("flag", ["--exif-transpose", "--no-exif-transpose"])
def test_train_loaders_turn_phone_photos_only_with_exif_transpose(tmp_path, flag):
    import train
    from distributed import Distributed
    from my_dataset import unnormalize

    photo = tmp_path / "phone.jpg"
    upright = _phone_photo(photo, 6)
    split = Split(["a"], [photo], [0], [photo], [0])
    args = train.get_args_parser().parse_args([flag, "--device-data", "--batch-size", "1"])
    notes = []
    loaders = train.build_dataloaders(split, args, 32, 0, torch.device("cpu"), Distributed(),
                                      notes.append)
    turned = flag == "--exif-transpose"
    # device_data decodes the bytes as stored, so --exif-transpose takes the CPU loader.
    assert ("note: --exif-transpose uses the CPU DataLoader; --device-data is off." in notes
            ) == turned
    if turned:
        training, validation = loaders
        assert training.dataset.dataset.exif_transpose is True  # inside SeededSamples
        assert validation.dataset.exif_transpose is True
        # The validation crop (resized to 48x32 then 36 high, centre 32x32) of the upright
        # picture: its red third begins at the left edge; blue fills the right.
        assert upright.size == (48, 32)
        (image, _), = loaders[1]
        red = unnormalize(image)[0, 0]
        assert red[:, :4].mean() > 0.9 and red[:, -8:].mean() < 0.1
