"""The unit of work: one output shard and the inputs assigned to it.

A shard flows through every stage as one object (as in img2dataset and
datatrove), so a shard is either wholly written or not at all, and a rerun can
skip finished shards by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .read.readers import InputRef


@dataclass
class Sample:
    key: str
    source: str
    sha256: str
    jpg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    caption: str | None = None
    caption_model: str | None = None  # model name, "input" when it came with the input, "none"
    caption_origin: str = ""  # with "input": where the caption was found (InputRef.caption_origin)
    meta: dict[str, Any] = field(default_factory=dict)  # fields the input already had
    conditions: dict[str, bytes] = field(default_factory=dict)
    condition_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: share of each condition map's pixels that are not zero (for reports and quality gates)
    coverage: dict[str, float] = field(default_factory=dict)
    crop_top: int = 0  # the resize window's offset (SDXL's crop conditioning)
    crop_left: int = 0
    phash: str | None = None  # perceptual hash, when the build looks for near-duplicates
    latents: bytes | None = None  # KEY.latents.npy (build --latents)
    bucket: tuple[int, int] | None = None  # (width, height) aspect bucket, keep_ratio builds
    latents_info: dict[str, Any] | None = None
    caption_precision: str | None = None  # the precision BLIP ran in, when it made the caption
    text_embeddings: bytes | None = None  # KEY.text.npy (build --text-embeddings)
    text_pooled: bytes | None = None  # KEY.text_pooled.npy (families with a pooled embedding)
    text_info: dict[str, Any] | None = None


@dataclass
class ShardWork:
    index: int
    inputs: list[InputRef]
    samples: list[Sample] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: things worth counting that are not rejections (e.g. openpose maps kept with no person)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def reject(self, source: str, stage: str, reason: str, message: str) -> None:
        self.errors.append({"source": source, "stage": stage, "error": reason, "message": message, "shard": self.name})


def shard_name(index: int) -> str:
    return f"{index:05d}"


def plan_shards(inputs: list[InputRef], samples_per_shard: int) -> list[ShardWork]:
    """Deterministic: the sorted listing cut into consecutive runs."""
    return [
        ShardWork(i, inputs[start:start + samples_per_shard])
        for i, start in enumerate(range(0, len(inputs), samples_per_shard))
    ]
