"""Decode, validate and resize one input image: bytes -> RGB array of the build's size.

Pure functions: every rejection is a `Rejected` with a short reason code, so a
build can count rejections by reason and never stop on one bad file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# We enforce our own pixel limit before decoding; PIL's own check would raise
# (or warn) with a different message for the same thing.
Image.MAX_IMAGE_PIXELS = None


class Rejected(Exception):
    """An input left out of the build; `reason` is the key counted in the stats."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ResizeSpec:
    resolution: int = 512
    mode: str = "center_crop"  # center_crop | keep_ratio | pad
    min_size: int = 256
    max_aspect: float = 3.0
    max_pixels: int = 100_000_000


@dataclass
class Decoded:
    image: np.ndarray  # H x W x 3 uint8, the build's size
    orig_width: int
    orig_height: int
    untouched: bool  # the source already was an RGB JPEG of the target size: its bytes can be kept
    crop_top: int = 0  # where the kept window starts in the resized image (SDXL conditions on it)
    crop_left: int = 0


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Header-only open with the decompression-bomb check, then full decode of frame 0."""
    if not data:
        raise Rejected("empty_file", "file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise Rejected("not_an_image", f"cannot identify image: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected("decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animations: the first frame
        img.load()
    except Exception as exc:
        raise Rejected("decode_error", f"cannot decode {img.format or 'image'}: {exc}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize(img: Image.Image, spec: ResizeSpec) -> np.ndarray:
    """center_crop: square, short side fitted; keep_ratio: short side fitted, sides cut
    to multiples of 8 (what the VAE needs); pad: long side fitted, padded black to square.

    Cropping and padding happen on the array: converting a PIL crop to numpy is
    measured at twice the cost of the whole decode."""
    width, height = img.size
    res = spec.resolution
    scale = res / (max(width, height) if spec.mode == "pad" else min(width, height))
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0 if scale < 0.5 else None)
    arr = np.asarray(img)
    if spec.mode == "pad":
        canvas = np.zeros((res, res, 3), np.uint8)
        top, left = (res - new_h) // 2, (res - new_w) // 2
        canvas[top:top + new_h, left:left + new_w] = arr
        return canvas
    target_w, target_h = (res, res) if spec.mode == "center_crop" else (new_w - new_w % 8, new_h - new_h % 8)
    if (target_w, target_h) != (new_w, new_h):
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        arr = np.ascontiguousarray(arr[top:top + target_h, left:left + target_w])
    return arr


def crop_offsets(width: int, height: int, spec: ResizeSpec) -> tuple[int, int]:
    """(top, left) of the window `resize` keeps, in the resized image's pixels (0, 0 for pad)."""
    if spec.mode == "pad":
        return 0, 0
    scale = spec.resolution / min(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    target_w, target_h = ((spec.resolution, spec.resolution) if spec.mode == "center_crop"
                          else (new_w - new_w % 8, new_h - new_h % 8))
    return (new_h - target_h) // 2, (new_w - target_w) // 2


def decode_and_resize(data: bytes, spec: ResizeSpec) -> Decoded:
    img = open_image(data, spec.max_pixels)
    source_format = img.format
    has_exif_rotation = img.getexif().get(0x0112, 1) not in (1, None)
    if has_exif_rotation:
        img = ImageOps.exif_transpose(img)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if short < spec.min_size:
        raise Rejected("too_small", f"{width}x{height}: shorter side below min_size={spec.min_size}")
    if long / short > spec.max_aspect:
        raise Rejected("bad_aspect", f"{width}x{height}: aspect ratio {long / short:.2f} above max_aspect={spec.max_aspect}")
    untouched = source_format == "JPEG" and img.mode == "RGB" and not has_exif_rotation
    out = resize(to_rgb(img), spec)
    untouched = untouched and out.shape[:2] == (height, width)
    return Decoded(out, width, height, untouched, *crop_offsets(width, height, spec))


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def coverage(condition: np.ndarray) -> float:
    """The share of pixels where the map is not zero (any channel)."""
    nonzero = condition != 0
    if nonzero.ndim == 3:
        nonzero = nonzero.any(axis=-1)
    return round(float(nonzero.mean()), 5)
