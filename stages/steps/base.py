"""What every step shares: the Step contract and its per-stage timer."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from ..work import ShardWork


class Step:
    """One job on a shard. `actor = True`: the step holds a model and runs as a Ray actor
    pool (`num_gpus` each); consecutive other steps fuse into one CPU task per shard."""

    name = "step"
    actor = False
    num_gpus = 0.0

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


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
