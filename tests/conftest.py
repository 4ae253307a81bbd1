"""Fixtures shared by the test files: the repository on sys.path, tiny images, demo data."""

from __future__ import annotations

import io
import sys
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
