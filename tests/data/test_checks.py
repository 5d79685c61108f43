"""Data checked before work: every file read to its end when the data set is built, so a
truncated image or a decompression bomb is named up front, not hours into a run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from attnpatch.data import ImageFolder
from attnpatch.errors import DataError
from attnpatch.images import read_image


def _photo(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root, bad_name: str, bad_bytes: bytes):
    for cls in ("circle", "square"):
        (root / cls).mkdir(parents=True)
        (root / cls / "ok.png").write_bytes(_photo("PNG"))
    (root / "circle" / bad_name).write_bytes(bad_bytes)
    return root


@pytest.mark.parametrize("fmt, name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_a_truncated_image_is_found_up_front(tmp_path, raises, fmt, name):
    # was: the header check passed; decoding failed when the image was first drawn
    data = _photo(fmt)
    root = _folder(tmp_path / "d", name, data[: len(data) // 2])
    with Image.open(root / "circle" / name) as im:
        assert im.size == (48, 48)  # the header alone is fine
    with raises(DataError, name, "not readable", "truncated"):
        ImageFolder(root, 32)


def test_a_decompression_bomb_is_named(tmp_path, raises, monkeypatch):
    # was: PIL's DecompressionBombError, naming no file
    root = _folder(tmp_path / "d", "huge.png", _photo("PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 48 x 48 > 2 x 500: a "bomb" here
    with raises(DataError, "huge.png", "decompression bomb"):
        ImageFolder(root, 32)
    with raises(DataError, "huge.png", "decompression bomb", "MAX_IMAGE_PIXELS"):
        read_image(root / "circle" / "huge.png")


def test_verify_image_reads_good_files(tmp_path):
    from attnpatch.images import verify_image

    for fmt in ("PNG", "JPEG", "BMP"):
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(_photo(fmt))
        assert verify_image(path) == (48, 48)
