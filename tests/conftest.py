"""Fixtures shared by the test files: the repository on sys.path, tiny images, demo data."""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def run_cli(main, argv: list[object]) -> tuple[int, str, str]:
    """Call a script's main(argv) in-process; return its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@dataclass(frozen=True)
class TrainedDemo:
    """The session's trained demo run (see the fixture); tests only read its files."""

    root: Path  # the working directory the run was started in
    data: Path
    output_dir: Path
    log_dir: Path
    code: int
    out: str
    err: str

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
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code, out, err = run_cli(train.main, train_argv(
            demo_flowers, Path("."), epochs=2, seed=3, val_rate=0.25,
            output_dir=Path("weights"), log_dir=Path("runs")))
    assert code == 0, err
    return TrainedDemo(root, demo_flowers, root / "weights", root / "runs", code, out, err)
