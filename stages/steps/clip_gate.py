"""--min-clip-score: drop samples whose caption does not describe the picture."""

from __future__ import annotations

from dataclasses import dataclass

from ..transform.decode import decode_rgb
from ..work import ShardWork
from .base import Step, timed

#: images decoded at a time: bounded, whatever the shard size
CHUNK = 16


@dataclass(frozen=True)
class ClipGateSettings:
    model: str
    min_score: float
    precision: str = "fp32"


class ClipGate(Step):
    """CLIP image-caption score (100 x cosine) below the floor: rejected with its score.
    An actor on a GPU."""

    name = "clip_score"

    def __init__(self, settings: ClipGateSettings, num_gpus: float = 0.0):
        from ..models.clip_score import ClipScorer

        self.settings, self.num_gpus, self.actor = settings, num_gpus, num_gpus > 0
        self.scorer = ClipScorer(settings.model, "cuda" if num_gpus > 0 else None, precision=settings.precision)

    def __call__(self, work: ShardWork) -> ShardWork:
        floor, kept = self.settings.min_score, []
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
