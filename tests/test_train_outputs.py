"""What a training run writes for TensorBoard besides the curves: the attention rollout."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

import train
from demo_data import make_demo_flowers
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
