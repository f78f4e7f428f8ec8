"""The build as a list of small steps, each `ShardWork -> ShardWork` with one job.

Executors (pipeline/executors.py) run the same list locally or on Ray; a step
with `actor = True` holds a model and runs as a Ray actor pool, the others run
fused in one CPU task per shard.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import annotators as annotator_registry
from .captioner import BlipCaptioner, CaptionModelError
from .decode import Rejected, ResizeSpec, decode_and_resize, decode_rgb, encode_jpeg, encode_png
from .readers import fetch
from .output import Output
from .shard import Sample, ShardWork
from .writer import write_shard

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@contextmanager
def timed(work: ShardWork, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        work.seconds[stage] = work.seconds.get(stage, 0.0) + time.perf_counter() - start


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Step:
    name = "step"
    actor = False
    num_gpus = 0.0

    def __call__(self, work: ShardWork) -> Any:
        raise NotImplementedError


class ReadDecode(Step):
    """Fetch, hash, de-duplicate, decode, validate and resize every input of a shard."""

    name = "read_decode"

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = ResizeSpec(cfg.resolution, cfg.resize_mode, cfg.min_size, cfg.max_aspect, cfg.max_pixels)

    def __call__(self, work: ShardWork) -> ShardWork:
        cfg = self.cfg
        seen: dict[str, str] = {}
        for ref in work.inputs:
            with timed(work, "read"):
                try:
                    got = fetch(ref, cfg.image_column, cfg.caption_column)
                except Exception as exc:
                    work.reject(ref.source, "read", "read_error", _error_text(exc))
                    continue
                known = str(got.meta.get("sha256", "")).lower()
                sha = known if _SHA256.match(known) else hashlib.sha256(got.data).hexdigest()
                key = sha[:16]
                if key in seen:
                    work.reject(ref.source, "dedup", "duplicate", f"same image (key {key}) as {seen[key]}")
                    continue
            with timed(work, "decode"):
                try:
                    decoded = decode_and_resize(got.data, self.spec)
                except Rejected as exc:
                    work.reject(ref.source, "decode", exc.reason, str(exc))
                    continue
                except Exception as exc:  # a codec bug must cost one sample, not the build
                    work.reject(ref.source, "decode", "decode_error", _error_text(exc))
                    continue
                jpg = got.data if decoded.untouched else encode_jpeg(decoded.image, cfg.jpeg_quality)
            seen[key] = ref.source
            height, width = decoded.image.shape[:2]
            sample = Sample(key, ref.source, sha, jpg, width, height, decoded.orig_width, decoded.orig_height,
                            meta={k: v for k, v in got.meta.items() if k not in ("conditions", "caption")},
                            pixels=decoded.image)
            self._caption_from_input(sample, got.caption)
            if decoded.untouched:  # the stored image is the input's: its conditions still match it
                infos = got.meta.get("conditions") or {}
                for name, png in got.conditions.items():
                    sample.conditions[name] = png
                    sample.condition_info[name] = infos.get(name, {"annotator": "input"})
            work.samples.append(sample)
        return work

    def _caption_from_input(self, sample: Sample, caption: str | None) -> None:
        cfg = self.cfg
        if caption is not None and (cfg.keep_captions or not cfg.captioning):
            sample.caption, sample.caption_model = caption, "input"
        elif not cfg.captioning:
            sample.caption, sample.caption_model = "", "none"
        else:
            if caption is not None:
                sample.meta["input_caption"] = caption
            sample.caption_model = cfg.caption_model


class Caption(Step):
    """BLIP captions for the samples that still lack one."""

    name = "caption"
    actor = True

    def __init__(self, cfg, num_gpus: float = 0.0):
        self.cfg = cfg
        self.num_gpus = num_gpus
        self.captioner = BlipCaptioner(cfg.caption_model, "cuda" if num_gpus > 0 else None, cfg.caption_prompt,
                                       cfg.caption_max_tokens, cfg.caption_beams, cfg.caption_batch_size)

    def __call__(self, work: ShardWork) -> ShardWork:
        todo = [s for s in work.samples if s.caption is None]
        if not todo:
            return work
        with timed(work, "caption"):
            images = [decode_rgb(s.jpg) for s in todo]
            try:
                captions = self.captioner(images)
            except CaptionModelError:
                raise  # a config problem: stop the build with its message
            except Exception as exc:
                failed = {s.key for s in todo}
                for s in todo:
                    work.reject(s.source, "caption", "caption_error", _error_text(exc))
                work.samples = [s for s in work.samples if s.key not in failed]
                return work
            for sample, caption in zip(todo, captions):
                sample.caption = caption
        return work


class Annotate(Step):
    """The named conditions for every sample; a failure drops that sample only.

    As a CPU step it runs fused with decoding; with `num_gpus` it is an actor that
    keeps its networks loaded (one actor can hold several annotators)."""

    name = "annotate"

    def __init__(self, cfg, names: list[str] | None = None, num_gpus: float = 0.0):
        self.cfg = cfg
        names = cfg.conditions if names is None else names
        self.annotators = annotator_registry.create(names, {k: v for k, v in cfg.annotator_params.items() if k in names})
        self.num_gpus = num_gpus
        self.actor = num_gpus > 0
        self._ready = False

    def __call__(self, work: ShardWork) -> ShardWork:
        if not self._ready:
            for annotator in self.annotators.values():
                annotator.setup()
            self._ready = True
        work.samples = [sample for sample in work.samples if self._annotate(work, sample)]
        return work

    def _annotate(self, work: ShardWork, sample: Sample) -> bool:
        missing = [n for n in self.annotators if n not in sample.conditions]
        if not missing:
            return True
        image = sample.pixels
        if image is None:
            with timed(work, "decode"):
                image = decode_rgb(sample.jpg)
        for name in missing:
            annotator = self.annotators[name]
            seed = annotator_registry.sample_seed(self.cfg.seed, sample.key, name)
            with timed(work, f"annotate:{name}"):
                try:
                    condition, used = annotator(image, np.random.default_rng(seed))
                    _check_condition(condition, image, annotator)
                    png = encode_png(condition)
                except Rejected as exc:
                    work.reject(sample.source, f"annotate:{name}", exc.reason, str(exc))
                    return False
                except Exception as exc:
                    work.reject(sample.source, f"annotate:{name}", "annotator_error", _error_text(exc))
                    return False
            if used.pop("_empty", False):
                work.counters[f"{name}:empty"] = work.counters.get(f"{name}:empty", 0) + 1
            sample.conditions[name] = png
            sample.condition_info[name] = annotator.describe({**used, "seed": seed})
        return True


def _check_condition(condition: np.ndarray, image: np.ndarray, annotator) -> None:
    expected = image.shape[:2] if annotator.mode == "L" else (*image.shape[:2], 3)
    if condition.shape != expected or condition.dtype != annotator.dtype:
        raise ValueError(f"annotator returned {condition.dtype} {condition.shape}, "
                         f"expected {np.dtype(annotator.dtype)} {expected}")


class WriteShard(Step):
    """The shard tar and its stats; returns the stats, the end of the line."""

    name = "write"

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, work: ShardWork) -> dict[str, Any]:
        return write_shard(Output(self.cfg.output), work, self.cfg.seed, self.cfg.conditions)


def make_steps(cfg, needs_captioner: bool, caption_num_gpus: float = 0.0, annotator_num_gpus: float = 0.0) -> list[Step]:
    """Annotate right after decoding, in the same task, while the pixels are in memory;
    with GPUs, the network annotators move to one GPU actor that holds them all; the
    captioner (an actor) decodes the stored JPEGs itself."""
    steps: list[Step] = [ReadDecode(cfg)]
    networks = [n for n in cfg.conditions if annotator_registry.REGISTRY[n].uses_model] if annotator_num_gpus else []
    plain = [n for n in cfg.conditions if n not in networks]
    if plain:
        steps.append(Annotate(cfg, plain))
    if networks:
        steps.append(Annotate(cfg, networks, annotator_num_gpus))
    if needs_captioner:
        steps.append(Caption(cfg, caption_num_gpus))
    steps.append(WriteShard(cfg))
    return steps
