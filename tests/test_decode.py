"""Decode/validate/resize on the inputs real collections contain."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.transform.decode import Rejected, ResizeSpec, decode_and_resize

SPEC = ResizeSpec(resolution=64, min_size=32, max_aspect=3.0, max_pixels=1_000_000)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w=120, h=80, colour=(200, 30, 60)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "pad"])
def test_resize_modes_give_documented_sizes(mode):
    out = decode_and_resize(encode(rgb(130, 70), "PNG"), ResizeSpec(64, mode, 32, 3.0, 10**6))
    expected = {"center_crop": (64, 64), "keep_ratio": (64, 112), "pad": (64, 64)}[mode]
    assert out.image.shape == (*expected, 3)
    assert out.image.dtype == np.uint8
    assert (out.orig_width, out.orig_height) == (130, 70)


def test_pad_mode_pads_black_around_the_picture():
    out = decode_and_resize(encode(rgb(128, 64, (255, 255, 255)), "PNG"), ResizeSpec(64, "pad", 32, 3.0, 10**6)).image
    assert out[0, 32].tolist() == [0, 0, 0] and out[32, 32].tolist() == [255, 255, 255]


def test_cmyk_16bit_palette_grayscale_become_rgb():
    cmyk = decode_and_resize(encode(rgb().convert("CMYK"), "JPEG"), SPEC).image
    assert abs(int(cmyk[10, 10, 0]) - 200) < 12 and cmyk[10, 10, 1] < 50
    sixteen = Image.fromarray(np.full((80, 120), 65535 // 2, dtype=np.uint16))
    assert abs(int(decode_and_resize(encode(sixteen, "PNG"), SPEC).image[5, 5, 0]) - 128) <= 1
    palette = rgb().convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_and_resize(encode(palette, "PNG"), SPEC).image[5, 5].tolist() == [200, 30, 60]
    gray = decode_and_resize(encode(rgb().convert("L"), "PNG"), SPEC).image
    assert gray.shape == (64, 64, 3) and len(set(gray[5, 5].tolist())) == 1


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (120, 80), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 60, 80))
    out = decode_and_resize(encode(img, "PNG"), ResizeSpec(80, "center_crop", 32, 3.0, 10**6)).image
    assert out[40, 5].tolist() == [0, 0, 255]
    assert out[40, 75].tolist() == [255, 255, 255]


def test_animation_uses_first_frame():
    frames = [rgb(colour=(255, 0, 0)), rgb(colour=(0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_and_resize(data, SPEC).image
    assert out[10, 10, 0] > 200 and out[10, 10, 1] < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (120, 80), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 60, 80))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_and_resize(encode(img, "JPEG", exif=exif), ResizeSpec(80, "keep_ratio", 32, 3.0, 10**6))
    assert (out.orig_width, out.orig_height) == (80, 120)
    assert out.image[5, 40].mean() > 200 and out.image[-5, 40].mean() < 50  # white half now on top
    assert not out.untouched


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"this is not an image at all", "not_an_image"),
    (encode(rgb(), "PNG")[:200], "decode_error"),
    (encode(rgb(20, 20), "PNG"), "too_small"),
    (encode(rgb(400, 100), "PNG"), "bad_aspect"),
    (encode(Image.new("1", (1500, 1000)), "PNG"), "decompression_bomb"),
])
def test_bad_inputs_are_rejected_with_reason(data, reason):
    with pytest.raises(Rejected) as info:
        decode_and_resize(data, SPEC)
    assert info.value.reason == reason


def test_target_sized_rgb_jpeg_passes_through_untouched():
    data = encode(rgb(64, 64), "JPEG", quality=90)
    assert decode_and_resize(data, SPEC).untouched
    assert not decode_and_resize(encode(rgb(64, 64), "PNG"), SPEC).untouched
