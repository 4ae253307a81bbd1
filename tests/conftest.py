"""What the test files share: the repository on sys.path (ROOT), tiny images, demo data,
train.py's argv (train_argv), a script's main run in-process (run_cli, one_error_line), the
session's trained demo run (trained_demo), checkpoints read back (load), a tiny ViT and
random batches (tiny_model, random_loader), a folder that refuses new files
(unwritable_folder), and a local HTTP server (server, no_proxies)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from vit_model import VisionTransformer

# The modules under test live in the repository root, beside this folder.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    """One encoded 2x2 JPEG; copying its bytes makes thousands of image files quickly."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (30, 200, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def demo_flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic flower_photos (5 classes x 12 images), made once per session.

    Tests only read it; anything they write goes to their own tmp_path.
    """
    from demo_data import make_demo_flowers

    return make_demo_flowers(tmp_path_factory.mktemp("demo") / "flower_photos", per_class=12)


def load(path: Path) -> dict:
    """A checkpoint read back as every command reads it."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- a tiny ViT

def tiny_model(num_classes: int = 3) -> VisionTransformer:
    """A ViT of 16 px images, 2x2 patches of 8 px, 2 blocks of width 32; seeded, so the
    same numbers every call."""
    import torch

    from vit_model import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=num_classes)


def random_loader(images: int, batch_size: int = 4, scale: float = 1.0,
                  device: str = "cpu") -> DataLoader:
    """`images` random 16 px images (standard deviation `scale`) with labels 0-2 for
    tiny_model, in batches of batch_size; the same draws every call."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(1)
    pixels = scale * torch.randn(images, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (images,), generator=generator)
    return DataLoader(TensorDataset(pixels.to(device), labels.to(device)),
                      batch_size=batch_size)


# --------------------------------------------------------------------------- train.py

def train_argv(data: Path, out: Path, *extra: object, **overrides: object) -> list[str]:
    """train.py's argv for a tiny CPU run of the demo model from scratch into out/.

    Checkpoints go to out/weights and TensorBoard logs to out/runs. A keyword overrides
    a flag (``lr=0.05`` -> ``--lr 0.05``; ``output_dir=...``); ``True`` gives a bare flag,
    ``False`` its ``--no-`` form and ``None`` leaves the flag out. Extra words go last.
    """
    settings: dict[str, object] = dict(
        data_path=data, model_name="vit_demo_patch8_64", weights="", freeze_layers=False,
        device="cpu", workers=0, batch_size=8, lr=0.01, epochs=1,
        output_dir=out / "weights", log_dir=out / "runs")
    settings.update(overrides)
    argv: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv + [str(word) for word in extra]


CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")


def epoch_checkpoints(out: Path, epochs: int) -> list[dict]:
    """The first `epochs` epoch checkpoints a train.py run wrote into out/weights."""
    return [load(out / "weights" / f"model-{epoch}.pth") for epoch in range(epochs)]


def assert_same_training(plain: list[dict], fast: list[dict], atol: float = 1e-5) -> None:
    """Every epoch's curves and the last model equal within atol; the head did move."""
    import torch

    for epoch, (a, b) in enumerate(zip(plain, fast, strict=True)):
        for name in CURVES:
            assert a["metrics"][name] == pytest.approx(b["metrics"][name], abs=atol), (
                epoch, name)
        assert a["samples"] == b["samples"]
    for key, value in plain[-1]["model"].items():
        torch.testing.assert_close(fast[-1]["model"][key], value, rtol=0, atol=atol, msg=key)
    assert plain[-1]["model"]["head.weight"].abs().sum() > 0  # the head did move


def run_cli(main, argv: list[object]) -> tuple[int, str, str]:
    """Call a script's main(argv) in-process; return its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, err: str, status: int = 2) -> str:
    """Exit status `status` and exactly one line on stderr, 'error: ...', with no traceback;
    returns that line. (Progress bars go to stdout, so stderr holds nothing else.)"""
    assert code == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


@dataclass(frozen=True)
class TrainedDemo:
    """The session's trained demo run (see the fixture); tests only read its files."""

    root: Path  # the working directory the run was started in
    data: Path
    output_dir: Path
    log_dir: Path
    out: str
    err: str
    seed: int        # not train.py's default: commands that rebuild the split must read it
    val_rate: float  # from the checkpoint, as they must this one

    @property
    def best(self) -> Path:
        return self.output_dir / "best.pth"


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory: pytest.TempPathFactory, demo_flowers: Path) -> TrainedDemo:
    """Two epochs of the demo model from scratch on demo_flowers, made once per session.

    Started from a fresh working directory with relative --output-dir/--log-dir, and with a
    non-default --seed and --val-rate, so commands that rebuild the split must read them
    from the checkpoint: 45 training and 15 validation images (3 of 12 per class).
    """
    import train

    root = tmp_path_factory.mktemp("trained_demo")
    seed, val_rate = 3, 0.25
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code, out, err = run_cli(train.main, train_argv(
            demo_flowers, Path("."), epochs=2, seed=seed, val_rate=val_rate,
            output_dir=Path("weights"), log_dir=Path("runs")))
    assert code == 0, err
    return TrainedDemo(root, demo_flowers, root / "weights", root / "runs", out, err, seed,
                       val_rate)


@pytest.fixture
def unwritable_folder(tmp_path: Path) -> Iterator[Path]:
    """An existing folder in which no file can be created: a folder of mode 555, or /sys
    where that does not stop the user (root ignores modes; sysfs refuses new files to all)."""
    import os
    import tempfile

    def refuses_files(folder: Path) -> bool:
        try:
            with tempfile.TemporaryFile(dir=folder):
                return False
        except OSError:
            return True

    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for folder in (locked, Path("/sys")):
            if folder.is_dir() and refuses_files(folder):
                yield folder
                return
        pytest.skip("no folder here refuses new files (root, and /sys writable)")
    finally:
        os.chmod(locked, 0o755)  # so that pytest can remove tmp_path


# --------------------------------------------------------------------------- a local server

@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib from sending 127.0.0.1 requests to a proxy set in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@dataclass
class Server:
    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)

    def publish(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.base_url}/{name}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path, no_proxies: None):
    """Serve tmp_path/served at http://127.0.0.1:<port>/ and record the paths requested."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
