"""Condition maps for samples: the annotators of a build, run on the stored JPEG's pixels,
with the quality gates on each map (flat depth, empty condition).

Not a step of its own: the maps are made inside the step that writes the shard
(annotate_and_write.py), which spools each finished sample to disk, so maps never pile
up in memory nor travel between tasks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..annotators import Annotator, sample_seed
from ..transform.decode import Rejected, coverage, decode_rgb, encode_png
from ..work import Sample, ShardWork
from .base import batches_by_size, error_text, timed


@dataclass(frozen=True)
class AnnotationSettings:
    seed: int = 0  # the build's seed: each sample's random parameters derive from it and its key
    min_depth_std: float | None = None  # flat_depth below this
    min_condition_coverage: float | None = None  # empty_condition below this share of non-zero pixels


class Annotation:
    """Runs annotators (made once, by the plan) on samples; a failure drops that sample only.

    `annotate_one`: every annotator on one decoded sample (the CPU annotators, one sample
    at a time). `annotate_chunk`: every annotator on a chunk of samples, in batches of each
    one's `batch_size` (the network annotators in a GPU actor)."""

    def __init__(self, annotators: dict[str, Annotator], settings: AnnotationSettings, num_gpus: float = 0.0):
        self.annotators = annotators
        self.settings = settings
        self.num_gpus = num_gpus
        self._ready = False

    def _setup(self) -> None:
        if not self._ready:
            for annotator in self.annotators.values():
                annotator.setup()
            self._ready = True

    @property
    def chunk_size(self) -> int:
        return max((a.batch_size for a in self.annotators.values()), default=1)

    def annotate_one(self, work: ShardWork, sample: Sample, image: np.ndarray) -> bool:
        self._setup()
        for name, annotator in self.annotators.items():
            if name in sample.conditions:
                continue
            seed = sample_seed(self.settings.seed, sample.key, name)
            with timed(work, f"annotate:{name}"):
                result = _run_one(annotator, image, seed)
            if not self._store(work, sample, name, annotator, image, seed, result):
                return False
        return True

    def annotate_chunk(self, work: ShardWork, samples: list[Sample]) -> list[Sample]:
        """Every annotator on these samples, in batches; returns the ones that got every map.
        Decoded images live for one chunk only."""
        self._setup()
        dropped: set[str] = set()
        for name, annotator in self.annotators.items():
            todo = [s for s in samples if name not in s.conditions and s.key not in dropped]
            for batch in batches_by_size(todo, annotator.batch_size):
                chunk, images = [], []
                with timed(work, "decode"):
                    for sample in batch:
                        try:
                            images.append(decode_rgb(sample.jpg))
                            chunk.append(sample)
                        except Exception as exc:
                            work.reject(sample.source, f"annotate:{name}", "decode_error", error_text(exc))
                            dropped.add(sample.key)
                if not chunk:
                    continue
                seeds = [sample_seed(self.settings.seed, s.key, name) for s in chunk]
                with timed(work, f"annotate:{name}"):
                    results = _run_batch(annotator, images, seeds)
                for sample, image, seed, result in zip(chunk, images, seeds, results):
                    if not self._store(work, sample, name, annotator, image, seed, result):
                        dropped.add(sample.key)
        return [s for s in samples if s.key not in dropped]

    def _store(self, work, sample, name, annotator, image, seed, result) -> bool:
        """Check a map, apply the gates, encode it and attach it to the sample (False: dropped)."""
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
            work.reject(sample.source, f"annotate:{name}", "annotator_error", error_text(exc))
            return False
        if used.pop("_empty", False):
            work.counters[f"{name}:empty"] = work.counters.get(f"{name}:empty", 0) + 1
        flat = self.settings.min_depth_std
        if name == "depth" and flat is not None and float(condition.std()) < flat:
            work.reject(sample.source, f"annotate:{name}", "flat_depth",
                        f"depth map std {float(condition.std()):.2f} (of 255) below min_depth_std={flat:g}")
            return False
        share = coverage(condition)
        floor = self.settings.min_condition_coverage
        if floor is not None and share < floor:
            work.reject(sample.source, f"annotate:{name}", "empty_condition",
                        f"{name}: {share:.4f} of its pixels are non-zero, below min_condition_coverage={floor:g}")
            return False
        sample.conditions[name] = png
        sample.condition_info[name] = info = annotator.describe({**used, "seed": seed})
        if annotator.uses_model:  # the precision its network ran in: part of what made the map
            info["precision"] = annotator.resolved_precision()
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
