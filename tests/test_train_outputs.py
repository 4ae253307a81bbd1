"""What a training run writes for TensorBoard besides the curves: the attention rollout."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

import train
from demo_data import make_demo_flowers


def test_attention_rollout_image_each_epoch(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_demo_flowers(tmp_path / "flower_photos", per_class=5)
    rc = train.main(["--data-path", str(data), "--model-name", "vit_demo_patch8_64",
                     "--weights", "", "--no-freeze-layers", "--epochs", "2", "--batch-size", "8",
                     "--lr", "0.05", "--device", "cpu", "--workers", "0",
                     "--output-dir", str(tmp_path / "weights"),
                     "--log-dir", str(tmp_path / "runs")])
    assert rc == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "attention_rollout" in events.Tags()["images"]
    images = events.Images("attention_rollout")
    assert [image.step for image in images] == [0, 1]
    for image in images:
        with Image.open(io.BytesIO(image.encoded_image_string)) as picture:
            assert picture.format == "PNG"
            assert picture.width > 2 * picture.height  # four maps side by side
