"""What a training run writes for TensorBoard besides the curves: the attention rollout."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from demo_data import make_demo_flowers
from my_dataset import MyDataSet, build_transforms, unnormalize
from utils import Split
from vit_model import VisionTransformer


@pytest.mark.parametrize("freeze", ["--no-freeze-layers", "--freeze-layers"])
def test_attention_rollout_image_each_epoch(tmp_path: Path, monkeypatch, freeze: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    passes = []  # batch sizes of the attention passes the run makes
    real_attention_maps = VisionTransformer.attention_maps

    def counted(model, images):
        passes.append(len(images))
        return real_attention_maps(model, images)

    monkeypatch.setattr(VisionTransformer, "attention_maps", counted)
    data = make_demo_flowers(tmp_path / "flower_photos", per_class=5)
    rc = train.main(["--data-path", str(data), "--model-name", "vit_demo_patch8_64",
                     "--weights", "", freeze, "--epochs", "3", "--batch-size", "8",
                     "--lr", "0.05", "--device", "cpu", "--workers", "0",
                     "--output-dir", str(tmp_path / "weights"),
                     "--log-dir", str(tmp_path / "runs")])
    assert rc == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "attention_rollout" in events.Tags()["images"]
    images = events.Images("attention_rollout")
    assert [image.step for image in images] == [0, 1, 2]
    for image in images:
        with Image.open(io.BytesIO(image.encoded_image_string)) as picture:
            assert picture.format == "PNG"
            assert picture.width > 2 * picture.height  # four maps side by side
    if freeze == "--freeze-layers":
        # The blocks never change, so neither does their attention: computed once, the
        # same picture every epoch.
        assert passes == [4]
        assert len({image.encoded_image_string for image in images}) == 1
    else:
        assert passes == [4, 4, 4]


@pytest.mark.parametrize("flag", ["--exif-transpose", "--no-exif-transpose"])
def test_attention_images_are_read_once_and_turned_as_validation_turns_them(tmp_path: Path,
                                                                           flag: str):
    # A phone photo: upright red on the left, stored turned with EXIF orientation 6.
    photo = tmp_path / "phone.jpg"
    upright = Image.new("RGB", (48, 32), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 16, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, quality=95, exif=exif)
    split = Split(["a"], [photo], [0], [photo], [0])
    args = train.get_args_parser().parse_args(
        [flag, "--no-freeze-layers", "--output-dir", str(tmp_path / "weights")])
    validation = MyDataSet([photo], [0], build_transforms(32, train=False),
                           exif_transpose=args.exif_transpose)
    (tmp_path / "weights").mkdir()  # train.claim_output_dir's part
    outputs = train.RunOutputs(args, split, tmp_path / "runs")
    try:
        batch = outputs.attention_images(32)
        torch.testing.assert_close(batch[0], validation[0][0], rtol=0, atol=0)
        red_on_the_left = unnormalize(batch)[0, 0][:, :4].mean() > 0.9
        assert red_on_the_left == (flag == "--exif-transpose")
        photo.unlink()  # every later epoch's rollout reuses the images read once
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=1)
        for epoch in range(2):
            outputs.attention_rollout(epoch, model, torch.device("cpu"))
        outputs.saver.wait()
        assert outputs.attention_images(32) is batch
    finally:
        outputs.close()


@pytest.mark.parametrize("flag", ["--output-dir", "--log-dir"])
def test_a_folder_that_cannot_be_made_is_one_error_line(tmp_path: Path, monkeypatch, capsys,
                                                        flag: str):
    data = make_demo_flowers(tmp_path / "flower_photos", per_class=5)
    refused = tmp_path / "refused"
    real_mkdir = Path.mkdir

    def mkdir(path, *args, **kwargs):  # root may write anywhere: inject the refusal
        if path == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    folders = {"--output-dir": str(tmp_path / "weights"), "--log-dir": str(tmp_path / "runs"),
               flag: str(refused)}
    rc = train.main(["--data-path", str(data), "--model-name", "vit_demo_patch8_64",
                     "--weights", "", "--device", "cpu", "--workers", "0",
                     *(item for pair in folders.items() for item in pair)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: Cannot write {refused} (Permission denied); check the folder's "
        f"permissions."], err
    assert not refused.exists()
    # Nothing of the refused run is left, not even the other folder made just before.
    assert not (tmp_path / "weights").exists() and not (tmp_path / "runs").exists()
