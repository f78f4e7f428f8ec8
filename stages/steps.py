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
from .decode import Rejected, ResizeSpec, coverage, decode_and_resize, decode_rgb, encode_jpeg, encode_png
from .buckets import bucket_for
from .http_fetch import FetchError, HttpOptions
from .near_duplicates import phash
from .readers import fetch
from .output import Output
from .shard import Sample, ShardWork
from .writer import ShardWriter

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: images a model step decodes at a time (CLIP gate, VAE latents): bounded, whatever the shard size
CHUNK = 16


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
        self.http = HttpOptions(timeout=cfg.fetch_timeout, retries=cfg.fetch_retries, user_agent=cfg.user_agent,
                                respect_opt_out=cfg.respect_opt_out)

    def __call__(self, work: ShardWork) -> ShardWork:
        cfg = self.cfg
        seen: dict[str, str] = {}
        for ref in work.inputs:
            with timed(work, "read"):
                try:
                    got = fetch(ref, cfg.image_column, cfg.caption_column, self.http)
                except FetchError as exc:  # timeout, http_error (with the status), opted_out, ...
                    work.reject(ref.source, "read", exc.reason, str(exc))
                    continue
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
                            crop_top=decoded.crop_top, crop_left=decoded.crop_left,
                            bucket=bucket_for(width, height, cfg.resolution) if cfg.resize_mode == "keep_ratio" else None)
            if cfg.near_duplicates is not None:
                with timed(work, "phash"):
                    sample.phash = phash(decoded.image)
            self._caption_from_input(sample, got.caption, ref.caption_origin)
            if decoded.untouched:  # the stored image is the input's: its conditions still match it
                infos = got.meta.get("conditions") or {}
                for name, png in got.conditions.items():
                    sample.conditions[name] = png
                    sample.condition_info[name] = infos.get(name, {"annotator": "input"})
            work.samples.append(sample)
        return work

    def _caption_from_input(self, sample: Sample, caption: str | None, origin: str = "") -> None:
        cfg = self.cfg
        if caption is not None and (cfg.keep_captions or not cfg.captioning):
            sample.caption, sample.caption_model, sample.caption_origin = caption, "input", origin
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
        failed: set[str] = set()
        size = max(1, self.cfg.caption_batch_size)
        for start in range(0, len(todo), size):  # decoded images: one batch's worth at a time
            chunk = todo[start:start + size]
            with timed(work, "caption"):
                try:
                    captions = self.captioner([decode_rgb(s.jpg) for s in chunk])
                except CaptionModelError:
                    raise  # a config problem: stop the build with its message
                except Exception as exc:  # costs this batch only
                    for s in chunk:
                        work.reject(s.source, "caption", "caption_error", _error_text(exc))
                        failed.add(s.key)
                    continue
            for sample, caption in zip(chunk, captions):
                sample.caption = caption
        if failed:
            work.samples = [s for s in work.samples if s.key not in failed]
        return work


class Annotate(Step):
    """The named conditions for every sample; a failure drops that sample only.

    Every annotator sees the stored JPEG's pixels, what the trainer will load, whatever
    the plan. Both uses are inside the writer (WriteShard), which spools each finished
    sample to disk, so maps never pile up in memory nor travel between tasks: CPU
    annotators through `annotate_one`, one sample at a time; network annotators on GPUs
    through `annotate_chunk`, a chunk of samples in batches of each one's `batch_size`."""

    name = "annotate"

    def __init__(self, cfg, names: list[str] | None = None, num_gpus: float = 0.0):
        self.cfg = cfg
        names = cfg.conditions if names is None else names
        self.annotators = annotator_registry.create(names, {k: v for k, v in cfg.annotator_params.items() if k in names})
        self.num_gpus = num_gpus
        self.actor = num_gpus > 0
        self._ready = False

    def _setup(self) -> None:
        if not self._ready:
            for annotator in self.annotators.values():
                annotator.setup()
            self._ready = True

    def annotate_one(self, work: ShardWork, sample: Sample, image: np.ndarray) -> bool:
        self._setup()
        for name, annotator in self.annotators.items():
            if name in sample.conditions:
                continue
            seed = annotator_registry.sample_seed(self.cfg.seed, sample.key, name)
            with timed(work, f"annotate:{name}"):
                result = _run_one(annotator, image, seed)
            if not self._store(work, sample, name, annotator, image, seed, result):
                return False
        return True

    @property
    def chunk_size(self) -> int:
        return max((a.batch_size for a in self.annotators.values()), default=1)

    def __call__(self, work: ShardWork) -> ShardWork:
        kept = []
        for start in range(0, len(work.samples), self.chunk_size):
            kept += self.annotate_chunk(work, work.samples[start:start + self.chunk_size])
        work.samples = kept
        return work

    def annotate_chunk(self, work: ShardWork, samples: list[Sample]) -> list[Sample]:
        """Every annotator on these samples, in batches; returns the ones that got every map.
        Decoded images live for one chunk only."""
        self._setup()
        dropped: set[str] = set()
        for name, annotator in self.annotators.items():
            todo = [s for s in samples if name not in s.conditions and s.key not in dropped]
            for start in range(0, len(todo), annotator.batch_size):
                chunk, images = [], []
                with timed(work, "decode"):
                    for sample in todo[start:start + annotator.batch_size]:
                        try:
                            images.append(decode_rgb(sample.jpg))
                            chunk.append(sample)
                        except Exception as exc:
                            work.reject(sample.source, f"annotate:{name}", "decode_error", _error_text(exc))
                            dropped.add(sample.key)
                if not chunk:
                    continue
                seeds = [annotator_registry.sample_seed(self.cfg.seed, s.key, name) for s in chunk]
                with timed(work, f"annotate:{name}"):
                    results = _run_batch(annotator, images, seeds)
                for sample, image, seed, result in zip(chunk, images, seeds, results):
                    if not self._store(work, sample, name, annotator, image, seed, result):
                        dropped.add(sample.key)
        return [s for s in samples if s.key not in dropped]

    def _store(self, work, sample, name, annotator, image, seed, result) -> bool:
        if isinstance(result, Rejected):
            work.reject(sample.source, f"annotate:{name}", result.reason, str(result))
            return False
        try:
            if isinstance(result, Exception):
                raise result
            condition, used = result
            _check_condition(condition, image, annotator)
            png = encode_png(condition)
        except Exception as exc:
            work.reject(sample.source, f"annotate:{name}", "annotator_error", _error_text(exc))
            return False
        if used.pop("_empty", False):
            work.counters[f"{name}:empty"] = work.counters.get(f"{name}:empty", 0) + 1
        flat = getattr(self.cfg, "min_depth_std", None)
        if name == "depth" and flat is not None and float(condition.std()) < flat:
            work.reject(sample.source, f"annotate:{name}", "flat_depth",
                        f"depth map std {float(condition.std()):.2f} (of 255) below min_depth_std={flat:g}")
            return False
        share = coverage(condition)
        floor = self.cfg.min_condition_coverage
        if floor is not None and share < floor:
            work.reject(sample.source, f"annotate:{name}", "empty_condition",
                        f"{name}: {share:.4f} of its pixels are non-zero, below min_condition_coverage={floor:g}")
            return False
        sample.conditions[name] = png
        sample.condition_info[name] = annotator.describe({**used, "seed": seed})
        sample.coverage[name] = share
        return True


def _run_one(annotator, image: np.ndarray, seed: int):
    try:
        return annotator(image, np.random.default_rng(seed))
    except Exception as exc:  # returned, not raised: it costs this sample only
        return exc


def _run_batch(annotator, images: list[np.ndarray], seeds: list[int]) -> list:
    """A batched call where the annotator has one; if the batch fails, image by image,
    so one bad image costs only itself."""
    try:
        return annotator.annotate_batch(images, [np.random.default_rng(s) for s in seeds])
    except Exception:
        return [_run_one(annotator, image, seed) for image, seed in zip(images, seeds)]


def _check_condition(condition: np.ndarray, image: np.ndarray, annotator) -> None:
    expected = image.shape[:2] if annotator.mode == "L" else (*image.shape[:2], 3)
    if condition.shape != expected or condition.dtype != annotator.dtype:
        raise ValueError(f"annotator returned {condition.dtype} {condition.shape}, "
                         f"expected {np.dtype(annotator.dtype)} {expected}")


class ClipGate(Step):
    """--min-clip-score: drop samples whose caption does not describe the picture (CLIP
    image-caption score below the floor), each with its score; an actor on a GPU."""

    name = "clip_score"

    def __init__(self, cfg, num_gpus: float = 0.0):
        from .clip_score import ClipScorer

        self.cfg, self.num_gpus, self.actor = cfg, num_gpus, num_gpus > 0
        self.scorer = ClipScorer(cfg.clip_model, "cuda" if num_gpus > 0 else None)

    def __call__(self, work: ShardWork) -> ShardWork:
        floor, kept = self.cfg.min_clip_score, []
        for start in range(0, len(work.samples), CHUNK):
            chunk = work.samples[start:start + CHUNK]
            with timed(work, "clip_score"):
                scores = self.scorer([decode_rgb(s.jpg) for s in chunk], [s.caption or "" for s in chunk])
            for sample, score in zip(chunk, scores):
                if score < floor:
                    work.reject(sample.source, "clip_score", "low_clip_score",
                                f"CLIP score {score:.2f} below min_clip_score={floor:g} for caption {sample.caption!r}")
                else:
                    kept.append(sample)
        work.samples = kept
        return work


class EncodeLatents(Step):
    """The VAE latents of every stored image (build --latents MODEL), batched; a GPU actor
    when the cluster has GPUs."""

    name = "latents"

    def __init__(self, cfg, num_gpus: float = 0.0):
        from .latents import LatentEncoder

        self.cfg, self.num_gpus, self.actor = cfg, num_gpus, num_gpus > 0
        self.encoder = LatentEncoder(cfg.latents, "cuda" if num_gpus > 0 else None)

    def __call__(self, work: ShardWork) -> ShardWork:
        from .latents import npy_bytes

        with timed(work, "latents"):
            by_size: dict[tuple[int, int], list[Sample]] = {}
            for sample in work.samples:  # one batch shape per call (keep_ratio builds have several)
                by_size.setdefault((sample.height, sample.width), []).append(sample)
            for group in by_size.values():
                for start in range(0, len(group), CHUNK):  # decoded images: one chunk at a time
                    chunk = group[start:start + CHUNK]
                    for sample, latent in zip(chunk, self.encoder([decode_rgb(s.jpg) for s in chunk])):
                        sample.latents, sample.latents_info = npy_bytes(latent), self.encoder.info(latent.shape)
        return work


class WriteShard(Step):
    """The end of the line: each sample's conditions, the sample spooled to local disk,
    then the shard tar and its stats; returns the stats. The CPU annotators run on one
    sample at a time (from its stored JPEG). With GPUs, this step is the actor that holds
    the network annotators: they run on a chunk of samples at a time (their batch), which
    is then spooled, so no condition map ever leaves the task that made it. A task here
    holds the shard's JPEGs and one chunk's maps."""

    name = "write"

    def __init__(self, cfg, annotate: Annotate | None = None, gpu_annotate: Annotate | None = None):
        self.cfg = cfg
        self.annotate = annotate
        self.gpu_annotate = gpu_annotate
        self.num_gpus = gpu_annotate.num_gpus if gpu_annotate is not None else 0.0
        self.actor = gpu_annotate is not None

    def __call__(self, work: ShardWork) -> dict[str, Any]:
        writer = ShardWriter(Output(self.cfg.output), work, self.cfg.seed, self.cfg.conditions)
        size = self.gpu_annotate.chunk_size if self.gpu_annotate is not None else 1
        try:
            samples, work.samples = work.samples, []
            for start in range(0, len(samples), size):
                chunk = samples[start:start + size]
                samples[start:start + size] = [None] * len(chunk)  # their bytes go to the spool; no second reference
                if self.gpu_annotate is not None:
                    chunk = self.gpu_annotate.annotate_chunk(work, chunk)
                for sample in chunk:
                    if self.annotate is None or self._annotate(work, sample):
                        with timed(work, "write"):
                            writer.add(sample)
            return writer.finish()
        finally:
            writer.close()

    def _annotate(self, work: ShardWork, sample: Sample) -> bool:
        with timed(work, "decode"):
            try:
                image = decode_rgb(sample.jpg)
            except Exception as exc:
                work.reject(sample.source, "annotate", "decode_error", _error_text(exc))
                return False
        return self.annotate.annotate_one(work, sample, image)


def make_steps(cfg, needs_captioner: bool, caption_num_gpus: float = 0.0, annotator_num_gpus: float = 0.0) -> list[Step]:
    """Decode, then the model steps that read only the JPEGs (captioner, CLIP gate, VAE
    latents), then the writer, which makes every condition map and spools it: on a CPU
    task, or with GPUs as the actor that holds the network annotators (the CPU annotators
    run there too). So the models see no samples a cheaper gate would drop, and condition
    maps never cross a task boundary."""
    networks = [n for n in cfg.conditions if annotator_registry.REGISTRY[n].uses_model] if annotator_num_gpus else []
    plain = [n for n in cfg.conditions if n not in networks]
    steps: list[Step] = [ReadDecode(cfg)]
    if needs_captioner:
        steps.append(Caption(cfg, caption_num_gpus))
    if getattr(cfg, "min_clip_score", None) is not None:
        steps.append(ClipGate(cfg, annotator_num_gpus or caption_num_gpus))
    if getattr(cfg, "latents", None):
        steps.append(EncodeLatents(cfg, annotator_num_gpus or caption_num_gpus))
    steps.append(WriteShard(cfg, Annotate(cfg, plain) if plain else None,
                            Annotate(cfg, networks, annotator_num_gpus) if networks else None))
    return steps
