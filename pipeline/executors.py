"""Executors: run the same list of steps over shards, in this process or on Ray Data.

On Ray, consecutive CPU steps fuse into one task per shard (read -> decode ->
annotate -> write never leaves the worker); a model-holding step (`actor=True`)
becomes an actor pool, one model per actor, fed one shard at a time. Shards
travel between operators as pickled bytes, so Arrow never has to understand them;
what travels is the shard's JPEGs and metadata: every annotator runs in the last step
(a CPU task, or with GPUs the actor holding the network annotators), which spools each
finished sample to local disk (stages/shards/spool.py).
"""

from __future__ import annotations

import pickle
from typing import Any, Iterable, Iterator

from common.ray_session import init_ray  # noqa: F401  (re-exported for the build)
from stages.work import ShardWork
from stages.steps.base import Step

def run_steps(steps: list[Step], work: Any) -> Any:
    for step in steps:
        work = step(work)
    return work


def run_local(steps: list[Step], works: list[ShardWork]) -> Iterator[dict[str, Any]]:
    """No Ray: for debugging, and the reference the Ray path is compared against.
    Shards are pickled between step groups exactly where Ray would, so what crosses
    between stages is the same on both executors."""
    groups = _group(steps)
    for work in works:
        for i, group in enumerate(groups):
            if i:
                work = pickle.loads(pickle.dumps(work))
            work = run_steps(group, work)
        yield work


def _group(steps: list[Step]) -> list[list[Step]]:
    groups: list[list[Step]] = []
    for step in steps:
        if step.actor or not groups or groups[-1][0].actor:
            groups.append([step])
        else:
            groups[-1].append(step)
    return groups


def _run_pickled(row: dict[str, Any], steps: list[Step]) -> dict[str, Any]:
    return {"index": row["index"], "payload": pickle.dumps(run_steps(steps, pickle.loads(row["payload"])))}


class _ActorStep:
    """Holds one model-carrying step for the actor's lifetime."""

    def __init__(self, step: Step):
        self.step = step

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        payloads = [pickle.dumps(self.step(pickle.loads(p))) for p in batch["payload"]]
        return {"index": batch["index"], "payload": payloads}


def run_ray(steps: list[Step], works: list[ShardWork], num_cpus: float = 1.0) -> Iterator[dict[str, Any]]:
    import ray.data

    if not works:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    groups = _group(steps)
    # Ray Data reserves half the CPUs for operators other than ours; with one fused
    # operator that leaves cores idle (measured: 20 tasks on 2 CPUs took 6.8 s instead
    # of 5.0 s). With an actor stage in the plan, the reservation keeps stages fed.
    ctx.op_resource_reservation_enabled = len(groups) > 1
    ds = ray.data.from_items([{"index": w.index, "payload": pickle.dumps(w)} for w in works],
                             override_num_blocks=len(works))
    for group in groups:
        if group[0].actor:
            step = group[0]
            ds = ds.map_batches(_ActorStep, fn_constructor_args=(step,), batch_size=1, batch_format="numpy",
                                num_gpus=step.num_gpus or None, num_cpus=None if step.num_gpus else num_cpus,
                                compute=ray.data.ActorPoolStrategy(size=step.concurrency))
        else:
            ds = ds.map(_run_pickled, fn_kwargs={"steps": group}, num_cpus=num_cpus)
    for row in ds.iter_rows():
        yield pickle.loads(row["payload"])


def run_ray_windows(steps: list[Step], works: Iterable[ShardWork], num_cpus: float = 1.0,
                    window: int | None = None) -> Iterator[dict[str, Any]]:
    """run_ray over a stream of shards, a window at a time (a few per CPU of the cluster),
    so a list of any length is never held whole: the driver holds one window's inputs."""
    import itertools

    import ray

    window = window or max(8, 2 * int(ray.cluster_resources().get("CPU", 1)))
    works = iter(works)
    while True:
        chunk = list(itertools.islice(works, window))
        if not chunk:
            return
        yield from run_ray(steps, chunk, num_cpus)
