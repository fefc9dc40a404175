"""What the app tests share: an uploaded PNG as the browser sends it, and the record.json of a run's files."""

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def png_bytes() -> Callable[..., bytes]:
    """Makes the bytes of a plain PNG upload: ``png_bytes()``, ``png_bytes((64, 64), (0, 0, 255))``."""

    def make(size: tuple[int, int] = (40, 32), colour: tuple[int, int, int] = (220, 30, 30)) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format="PNG")
        return buffer.getvalue()

    return make


@pytest.fixture
def record_of() -> Callable[[list[str]], dict]:
    """Reads the record.json among the files a tab's run returned: ``record_of(files)["seed"]``."""

    def read(files: list[str]) -> dict:
        return json.loads(next(Path(f) for f in files if f.endswith("record.json")).read_text())

    return read
