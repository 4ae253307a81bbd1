"""train.py --download (from a local HTTP server) and --device-data on the CPU."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import torch

import download
import train
from vit_model import create_model


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder served on 127.0.0.1; yields (folder, base URL)."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def flowers_archive(demo_flowers: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(demo_flowers, arcname="flower_photos")
    return buffer.getvalue()


def test_download_fetches_missing_data_and_weights_then_trains(
        demo_flowers, served, tmp_path, monkeypatch):
    root, url = served
    (root / "flower_photos.tgz").write_bytes(flowers_archive(demo_flowers))
    weights_file = tmp_path / "pretrained.pth"
    torch.save(create_model("vit_demo_patch8_64", num_classes=10).state_dict(), weights_file)
    data = weights_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:8]
    (root / f"pretrained-{digest}.pth").write_bytes(data)
    monkeypatch.setattr(download, "FLOWERS_URL", f"{url}/flower_photos.tgz")
    monkeypatch.setattr(download, "FLOWER_CLASS_COUNTS", {c: 12 for c in (
        "daisy", "dandelion", "roses", "sunflowers", "tulips")})
    monkeypatch.setitem(download.WEIGHTS, "pth", download.WEIGHTS["pth"]._replace(
        url=f"{url}/pretrained-{digest}.pth"))

    target = tmp_path / "work"
    code = train.main([
        "--download", "--data-path", str(target / "flower_photos"),
        "--weights", str(target / "vit.pth"), "--model-name", "vit_demo_patch8_64",
        "--epochs", "1", "--device", "cpu", "--workers", "0",
        "--output-dir", str(target / "weights"), "--log-dir", str(target / "runs")])
    assert code == 0
    assert len(list((target / "flower_photos" / "roses").glob("*.jpg"))) == 12
    assert (target / "vit.pth").read_bytes() == data
    assert (target / "weights" / "best.pth").is_file()


def test_download_refuses_a_data_path_it_cannot_fetch(tmp_path, capsys):
    code = train.main(["--download", "--data-path", str(tmp_path / "my_images"),
                       "--weights", "", "--device", "cpu"])
    assert code == 2
    assert "--download fetches flower_photos" in capsys.readouterr().err


def test_device_data_trains_on_the_cpu(demo_flowers, tmp_path, capsys):
    code = train.main([
        "--device-data", "--data-path", str(demo_flowers), "--model-name", "vit_demo_patch8_64",
        "--weights", "", "--no-freeze-layers", "--epochs", "2", "--device", "cpu",
        "--workers", "0", "--output-dir", str(tmp_path / "weights"),
        "--log-dir", str(tmp_path / "runs")])
    assert code == 0
    assert "Images decoded once and kept on cpu." in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "weights" / "model-1.pth", weights_only=True)
    assert checkpoint["samples"] == {"train": 50, "val": 10}
    # Each epoch's validation confusion matrix is a TensorBoard image.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs").iterdir())),
                              size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("confusion_matrix")] == [0, 1]


def test_frozen_backbone_cached_validation_matches_full_validation(demo_flowers, tmp_path):
    pretrained = tmp_path / "pretrained.pth"
    torch.save(create_model("vit_demo_patch8_64", num_classes=5).state_dict(), pretrained)
    results = {}
    for flag in ("--cache-val-features", "--no-cache-val-features"):
        out = tmp_path / flag
        assert train.main([
            flag, "--data-path", str(demo_flowers), "--model-name", "vit_demo_patch8_64",
            "--weights", str(pretrained), "--freeze-layers", "--epochs", "2", "--lr", "0.1",
            "--device", "cpu", "--workers", "0", "--output-dir", str(out / "weights"),
            "--log-dir", str(out / "runs")]) == 0
        results[flag] = [torch.load(out / "weights" / f"model-{e}.pth",
                                    weights_only=True)["metrics"] for e in (0, 1)]
    for cached, full in zip(results["--cache-val-features"], results["--no-cache-val-features"],
                            strict=True):
        assert cached["val_acc"] == full["val_acc"]
        assert cached["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
        assert cached["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)


def test_compile_saves_the_plain_module(demo_flowers, tmp_path):
    assert train.main([
        "--compile", "--data-path", str(demo_flowers), "--model-name", "vit_demo_patch8_64",
        "--weights", "", "--no-freeze-layers", "--epochs", "1", "--device", "cpu",
        "--workers", "0", "--output-dir", str(tmp_path / "weights"),
        "--log-dir", str(tmp_path / "runs")]) == 0
    state = torch.load(tmp_path / "weights" / "best.pth", weights_only=True)["model"]
    assert not any(key.startswith("_orig_mod.") for key in state)
    model = create_model("vit_demo_patch8_64", num_classes=5)
    model.load_state_dict(state, strict=True)
