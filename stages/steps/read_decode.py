"""The first step: every input of a shard fetched, hashed, de-duplicated, decoded,
validated and resized; each failure is one rejection with its reason."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..read.http_fetch import FetchError, HttpOptions
from ..read.readers import fetch
from ..transform.buckets import bucket_for
from ..transform.decode import Rejected, ResizeSpec, decode_and_resize, encode_jpeg
from ..transform.near_duplicates import phash
from ..work import Sample, ShardWork
from .base import Step, error_text, timed

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CaptionPolicy:
    """Which caption a sample starts with: the input's (keep_input, or no captioner) or
    none yet, to be made by `model` (None: no captioner in this build)."""

    model: str | None
    keep_input: bool = False


@dataclass(frozen=True)
class ReadSettings:
    resize: ResizeSpec
    http: HttpOptions
    captions: CaptionPolicy
    jpeg_quality: int = 95
    image_column: str = "image"
    caption_column: str = "caption"
    #: the build's resolution when it records aspect buckets (keep_ratio), else None
    bucket_resolution: int | None = None
    #: compute each sample's perceptual hash (--near-duplicates)
    phash: bool = False


class ReadDecode(Step):
    """Fetch, hash, de-duplicate, decode, validate and resize every input of a shard."""

    name = "read_decode"

    def __init__(self, settings: ReadSettings):
        self.settings = settings

    def __call__(self, work: ShardWork) -> ShardWork:
        s = self.settings
        seen: dict[str, str] = {}
        for ref in work.inputs:
            with timed(work, "read"):
                try:
                    got = fetch(ref, s.image_column, s.caption_column, s.http)
                except FetchError as exc:  # timeout, http_error (with the status), opted_out, ...
                    work.reject(ref.source, "read", exc.reason, str(exc))
                    continue
                except Exception as exc:
                    work.reject(ref.source, "read", "read_error", error_text(exc))
                    continue
                known = str(got.meta.get("sha256", "")).lower()
                sha = known if _SHA256.match(known) else hashlib.sha256(got.data).hexdigest()
                key = sha[:16]
                if key in seen:
                    work.reject(ref.source, "dedup", "duplicate", f"same image (key {key}) as {seen[key]}")
                    continue
            with timed(work, "decode"):
                try:
                    decoded = decode_and_resize(got.data, s.resize)
                except Rejected as exc:
                    work.reject(ref.source, "decode", exc.reason, str(exc))
                    continue
                except Exception as exc:  # a codec bug must cost one sample, not the build
                    work.reject(ref.source, "decode", "decode_error", error_text(exc))
                    continue
                jpg = got.data if decoded.untouched else encode_jpeg(decoded.image, s.jpeg_quality)
            seen[key] = ref.source
            height, width = decoded.image.shape[:2]
            sample = Sample(key, ref.source, sha, jpg, width, height, decoded.orig_width, decoded.orig_height,
                            meta={k: v for k, v in got.meta.items() if k not in ("conditions", "caption")},
                            crop_top=decoded.crop_top, crop_left=decoded.crop_left,
                            bucket=bucket_for(width, height, s.bucket_resolution) if s.bucket_resolution else None)
            if s.phash:
                with timed(work, "phash"):
                    sample.phash = phash(decoded.image)
            _caption_from_input(sample, got.caption, ref.caption_origin, s.captions)
            if decoded.untouched:  # the stored image is the input's: its conditions still match it
                infos = got.meta.get("conditions") or {}
                for name, png in got.conditions.items():
                    sample.conditions[name] = png
                    sample.condition_info[name] = infos.get(name, {"annotator": "input"})
            work.samples.append(sample)
        return work


def _caption_from_input(sample: Sample, caption: str | None, origin: str, policy: CaptionPolicy) -> None:
    if caption is not None and (policy.keep_input or policy.model is None):
        sample.caption, sample.caption_model, sample.caption_origin = caption, "input", origin
    elif policy.model is None:
        sample.caption, sample.caption_model = "", "none"
    else:
        if caption is not None:
            sample.meta["input_caption"] = caption
        sample.caption_model = policy.model
