"""Every PIL image mode decodes to the same RGB as its 8-bit equivalent, through each reader that
takes image files: ``predict`` (open_image, and an exported model's preprocessing of a PIL image),
stage 1 (sources._decode) and extraction (streaming.open_rgb). A 16-bit gray PNG used to come out
all white (``convert("RGB")`` clips 16-bit values)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltcache.data.decode import to_rgb
from ltcache.data.sources import _decode
from ltcache.data.streaming import open_rgb
from ltcache.export import _resize_crop
from ltcache.predict import open_image

H, W = 6, 7
RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GRAY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def _png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    head = struct.pack(">IIBBBBB", rgb16.shape[1], rgb16.shape[0], 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _case(mode: str, folder: Path):
    """(a file in ``mode``, the same picture as an 8-bit RGB array)."""
    gray3 = np.repeat(GRAY8[..., None], 3, axis=2)
    if mode == "I;16":
        im, want = Image.fromarray(GRAY8.astype(np.uint16) * 257), gray3
        assert im.mode == "I;16"
        ext = "png"
    elif mode == "I":
        im, want, ext = Image.fromarray(GRAY8.astype(np.int32) * 257, "I"), gray3, "tif"
    elif mode == "F":
        im, want, ext = Image.fromarray(GRAY8.astype(np.float32), "F"), gray3, "tif"
    elif mode == "RGB;16":
        path = folder / "rgb16.png"
        _png16_rgb(path, RGB8.astype(np.uint16) * 257)
        return path, RGB8
    elif mode == "P":
        im = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        want, ext = np.asarray(im.convert("RGB")), "png"
    elif mode == "P+transparency":
        im = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
        want, ext = np.asarray(im.convert("RGBA"))[..., :3], "png"
    elif mode == "RGBA":
        alpha = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)
        im, want, ext = Image.fromarray(np.concatenate([RGB8, alpha], 2), "RGBA"), RGB8, "png"
    elif mode == "LA":
        alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
        im, want, ext = Image.fromarray(np.stack([GRAY8, alpha], 2), "LA"), gray3, "png"
    elif mode == "CMYK":
        im, want, ext = Image.fromarray(RGB8).convert("CMYK"), RGB8, "tif"
    elif mode == "1":
        bits = GRAY8 > 127
        im, want, ext = Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, 2), "png"
    elif mode == "L":
        im, want, ext = Image.fromarray(GRAY8, "L"), gray3, "png"
    else:
        im, want, ext = Image.fromarray(RGB8), RGB8, "png"
    path = folder / f"img.{ext}"
    im.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    return path, want


MODES = ["I;16", "I", "F", "RGB;16", "P", "P+transparency", "RGBA", "LA", "CMYK", "1", "L", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_like_its_8bit_equivalent(tmp_path, mode):
    path, want = _case(mode, tmp_path)
    with Image.open(path) as im:
        if mode != "RGB;16":
            assert im.mode == ("P" if mode.startswith("P") else "I;16" if mode == "I;16" else mode)
        direct = np.asarray(to_rgb(im))
        as_given = _resize_crop(im, min(H, W), min(H, W))          # an exported model given a PIL image
    got = {"to_rgb": direct,
           "predict": np.asarray(open_image(path)),
           "extraction": np.asarray(open_rgb(str(path))),
           "stage1": _decode(str(path), 32).permute(1, 2, 0).numpy()}
    for where, arr in got.items():
        assert arr.dtype == np.uint8 and arr.shape == (H, W, 3), where
        assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1, (where, mode)
    top = (H - min(H, W)) // 2, (W - min(H, W)) // 2
    crop = want[top[0]:top[0] + min(H, W), top[1]:top[1] + min(H, W)]
    assert np.abs(as_given.permute(1, 2, 0).numpy().astype(int) - crop.astype(int)).max() <= 1


def test_sixteen_bit_gray_is_not_white(tmp_path):
    """The reported case: a 16-bit gray picture read through convert("RGB") is all 255."""
    path, want = _case("I;16", tmp_path)
    with Image.open(path) as im:
        assert np.asarray(im.convert("RGB")).min() == 255 or GRAY8.max() == 0   # what PIL alone does
    assert np.array_equal(np.asarray(open_image(path)), want)


def test_float_and_int_images_are_clipped_not_wrapped():
    f = Image.fromarray(np.array([[-5.0, 300.0, float("nan"), 127.6]], np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 255, 0, 128]
    i = Image.fromarray(np.array([[-1, 70000, 65535, 256]], np.int32), "I")
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 255, 255, 1]
