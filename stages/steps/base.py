"""What every step shares: the Step contract and its per-stage timer."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from ..work import Sample, ShardWork


class Step:
    """One job on a shard. `actor = True`: the step holds a model and runs as a Ray actor
    pool (`num_gpus` each); consecutive other steps fuse into one CPU task per shard."""

    name = "step"
    actor = False
    num_gpus = 0.0
    #: actors in the step's pool (actor steps only; the plan sizes it from the GPUs)
    concurrency = 1

    def __call__(self, work: ShardWork) -> Any:
        raise NotImplementedError


@contextmanager
def timed(work: ShardWork, stage: str):
    """Adds the block's wall time to the shard's seconds for `stage` (the stats' timings)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        work.seconds[stage] = work.seconds.get(stage, 0.0) + time.perf_counter() - start


def batches_by_size(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Batches of at most `size` samples, each of one image size (keep_ratio builds have
    several; a network takes one tensor shape per call)."""
    by_size: dict[tuple[int, int], list[Sample]] = {}
    for sample in samples:
        by_size.setdefault((sample.height, sample.width), []).append(sample)
    return [group[i:i + size] for group in by_size.values() for i in range(0, len(group), size)]


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
