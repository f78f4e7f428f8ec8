"""Writing shard tars: one shard's samples into its tar and its stats (the shard's
completion marker), and rewriting a finished tar without some samples (cross-shard
duplicates). Layout: docs/SCHEMA.md; the index files are stages/shards/manifest.py's.

Everything lands under a temporary name first and is renamed when whole, so a
killed build never leaves a half file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from typing import IO, Any, Iterator

from ..work import Sample, ShardWork
from .layout import (PER_SAMPLE_FIELDS, SHARDS_DIR, TEXT_MEMBER, TEXT_POOLED_MEMBER, condition_sort_key, stats_path,
                     tar_path)
from .output import Output, write_json
from .spool import SampleSpool


def sample_json(sample: Sample, build_seed: int) -> dict[str, Any]:
    meta = dict(sample.meta)  # fields the input had (img2dataset's url, status, ...) stay
    meta.update({
        "key": sample.key,
        "source": sample.source,
        "sha256": sample.sha256,
        "orig_width": sample.orig_width,
        "orig_height": sample.orig_height,
        "crop_top": sample.crop_top,
        "crop_left": sample.crop_left,
        "width": sample.width,
        "height": sample.height,
        "caption_model": sample.caption_model,
        "conditions": {name: sample.condition_info[name] for name in sorted(sample.conditions, key=condition_sort_key)},
        "seed": build_seed,
    })
    if sample.caption_precision is not None:
        meta["caption_precision"] = sample.caption_precision
    if sample.latents_info is not None:
        meta["latents"] = sample.latents_info
    if sample.text_info is not None:
        meta["text_embeddings"] = sample.text_info
    if sample.bucket is not None:
        meta["bucket"] = list(sample.bucket)
    return meta


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed: the same build gives the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def sample_members(sample: Sample, build_seed: int) -> Iterator[tuple[str, bytes]]:
    """A sample's tar members in their fixed order (KEY.jpg, .txt, .json, conditions, latents,
    prompt embeddings)."""
    yield f"{sample.key}.jpg", sample.jpg
    yield f"{sample.key}.txt", (sample.caption or "").replace("\n", " ").encode("utf-8")
    yield f"{sample.key}.json", json.dumps(sample_json(sample, build_seed), sort_keys=True).encode()
    for name in sorted(sample.conditions, key=condition_sort_key):
        yield f"{sample.key}.{name}.png", sample.conditions[name]
    if sample.latents is not None:
        yield f"{sample.key}.latents.npy", sample.latents
    if sample.text_embeddings is not None:
        yield f"{sample.key}.{TEXT_MEMBER}", sample.text_embeddings
    if sample.text_pooled is not None:
        yield f"{sample.key}.{TEXT_POOLED_MEMBER}", sample.text_pooled


class HashingWriter:
    """A write-only file that counts and hashes what passes through (tarfile asks tell())."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.size, self.sha = handle, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes one shard: finished samples go to a local spool as they come (add), then
    `finish` streams the tar into place in key order and writes the stats, the shard's
    completion marker. Memory: one sample at a time plus a small record per sample."""

    def __init__(self, out: Output, work: ShardWork, build_seed: int, conditions: list[str]):
        self.out, self.work, self.build_seed = out, work, build_seed
        self.conditions = sorted(conditions, key=condition_sort_key)
        self.spool = SampleSpool()
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, sample: Sample) -> None:
        self.spool.add(sample.key, sample_members(sample, self.build_seed))
        self.rows[sample.key] = {
            "sources": sample.source, "caption_sources": caption_source(sample),
            "caption_words": len((sample.caption or "").split()), "phashes": sample.phash,
            "coverage": {name: _coverage(sample, name) for name in self.conditions},
        }

    def finish(self) -> dict[str, Any]:
        work, out = self.work, self.out
        out.makedirs(SHARDS_DIR)
        start = time.perf_counter()
        keys = sorted(self.rows)
        with out.open_atomic(tar_path(work.name)) as handle:
            sink = HashingWriter(handle)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key in keys:
                    for name, data in self.spool.members(key):
                        _tar_member(tar, name, data)
        self.spool.close()
        seconds = {**work.seconds, "write": work.seconds.get("write", 0.0) + time.perf_counter() - start}
        rows = [self.rows[k] for k in keys]
        stats = {
            "shard": work.name,
            "inputs": len(work.inputs),
            "samples": len(keys),
            "bytes": sink.size,
            "sha256": sink.sha.hexdigest(),
            "conditions": self.conditions,
            "rejected": dict(sorted(Counter(e["error"] for e in work.errors).items())),
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "counters": dict(sorted(work.counters.items())),
            "keys": keys,
            # per sample, in key order like keys: what reports and dataset cards summarise
            **{field: [row[field] for row in rows] for field in PER_SAMPLE_FIELDS if field != "keys"},
            "coverage": {name: [row["coverage"][name] for row in rows] for name in self.conditions},
            "errors": work.errors,
        }
        write_json(out, stats_path(work.name), stats)
        return stats

    def close(self) -> None:
        self.spool.close()


def _coverage(sample: Sample, name: str) -> float | None:
    """Measured by the annotate step; a condition that came with the input is decoded here."""
    if name in sample.coverage:
        return sample.coverage[name]
    if name not in sample.conditions:
        return None
    import cv2
    import numpy as np

    from ..transform.decode import coverage

    return coverage(cv2.imdecode(np.frombuffer(sample.conditions[name], np.uint8), cv2.IMREAD_UNCHANGED))


def caption_source(sample: Sample) -> str:
    """Where a sample's caption came from, in words: 'BLIP <model>', 'input: <where>', 'none'."""
    if sample.caption_model == "input":
        return f"input: {sample.caption_origin}" if sample.caption_origin else "input"
    if not sample.caption_model or sample.caption_model == "none" or not sample.caption:
        return "none"
    return f"BLIP {sample.caption_model}"


def drop_samples(out: Output, stats: dict[str, Any], drops: dict[str, dict[str, Any]]) -> None:
    """Remove samples (key -> its errors.jsonl record) from a finished shard: the tar is
    rewritten without them, then its stats (the completion marker) with them as errors."""
    tar_name = tar_path(stats["shard"])
    with out.open_read(tar_name) as src, out.open_atomic(tar_name) as handle:
        sink = HashingWriter(handle)
        _copy_tar_without(src, sink, set(drops))
    stats["errors"].extend(drops.values())
    keep = [i for i, k in enumerate(stats["keys"]) if k not in drops]
    for field in PER_SAMPLE_FIELDS:
        if field in stats:
            stats[field] = [stats[field][i] for i in keep]
    stats["coverage"] = {name: [values[i] for i in keep] for name, values in stats.get("coverage", {}).items()}
    stats.update(samples=len(keep), bytes=sink.size, sha256=sink.sha.hexdigest(),
                 rejected=dict(sorted(Counter(e["error"] for e in stats["errors"]).items())))
    write_json(out, stats_path(stats["shard"]), stats)


def _copy_tar_without(src: IO[bytes], dst: IO[bytes], drop_keys: set[str]) -> None:
    """Copy a shard tar member by member (streamed), leaving out the samples in drop_keys."""
    with tarfile.open(fileobj=src, mode="r|") as source, tarfile.open(fileobj=dst, mode="w", format=tarfile.USTAR_FORMAT) as target:
        for member in source:
            if member.name.split(".", 1)[0] not in drop_keys:
                _tar_member(target, member.name, source.extractfile(member).read())
