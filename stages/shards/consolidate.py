"""The end of a build in bounded memory, whatever its size.

Every shard's completion record (NAME_stats.json) is read once, one at a time, in shard
order. Cross-shard exact duplicates are found through an index on the driver's local
disk: each sample's 64-bit key goes to one of BUCKETS files by its top bits, and each
file is then sorted on its own, so memory holds one bucket (1/BUCKETS of the keys), not
the build. errors.jsonl is streamed. What stays in memory is one small manifest entry
per shard. (Near-duplicate search, `--near-duplicates`, keeps one pHash per sample in
memory: 8 bytes and an index entry each.)
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .manifest import load_stats, manifest_entry
from .output import Output
from .writer import drop_samples

BUCKETS = 64
_RECORD = np.dtype([("key", "<u8"), ("shard", "<u4"), ("pos", "<u4")])


class KeyIndex:
    """(key, shard number, position) records spread over bucket files by the key's top bits."""

    def __init__(self, folder: Path, buckets: int = BUCKETS):
        self.folder, self.buckets = folder, buckets
        self.shift = np.uint64(64 - int(np.log2(buckets)))
        self.files = [open(folder / f"keys-{b:03d}.bin", "ab") for b in range(buckets)]

    def add(self, shard: int, keys: list[str]) -> None:
        if not keys:
            return
        records = np.empty(len(keys), _RECORD)
        records["key"] = [int(k, 16) for k in keys]  # keys are 16 hex digits (64 bits of the sha256)
        records["shard"] = shard
        records["pos"] = np.arange(len(keys))
        bucket = (records["key"] >> self.shift).astype(np.int64)
        for b in np.unique(bucket):
            records[bucket == b].tofile(self.files[b])

    def repeats(self) -> list[tuple[int, int, int, int]]:
        """(shard, pos) of every record whose key an earlier shard already has, with the
        (shard, pos) of that first one: [(shard, pos, first shard, first pos)]."""
        for handle in self.files:
            handle.close()
        found = []
        for b in range(self.buckets):
            records = np.fromfile(self.folder / f"keys-{b:03d}.bin", _RECORD)
            if len(records) < 2:
                continue
            records = records[np.lexsort((records["pos"], records["shard"], records["key"]))]
            same = np.flatnonzero(records["key"][1:] == records["key"][:-1]) + 1
            for i in same:
                first = i - 1
                while first > 0 and records["key"][first - 1] == records["key"][i]:
                    first -= 1
                found.append((int(records["shard"][i]), int(records["pos"][i]),
                              int(records["shard"][first]), int(records["pos"][first])))
        return found


def finish(out: Output, shard_names: list[str], max_near_distance: int | None = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Drop cross-shard (and, when asked, near) duplicates, write errors.jsonl, and return
    the manifest's shard entries with the totals: {"entries", "samples", "rejected"}."""
    names = sorted(shard_names)
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="controlforge-end-") as tmp:
        index = KeyIndex(Path(tmp))
        for number, name in enumerate(names):
            stats = load_stats(out, name)
            entries.append(manifest_entry(stats))
            index.add(number, stats["keys"])
        changed = _drop_repeats(out, names, index.repeats())
    if max_near_distance is not None:
        changed |= _drop_near_duplicates(out, names, max_near_distance, log)
    for number in changed:
        entries[number] = manifest_entry(load_stats(out, names[number]))
    rejected = _write_errors(out, names)
    return {"entries": entries, "samples": sum(e["samples"] for e in entries), "rejected": rejected}


def _drop_repeats(out: Output, names: list[str], repeats: list[tuple[int, int, int, int]]) -> set[int]:
    """Remove each repeat from its shard, naming the copy that stays. Idempotent: after a
    kill, a rerun finds nothing left to drop in shards already rewritten."""
    by_shard: dict[int, list[tuple[int, int, int]]] = {}
    for shard, pos, first_shard, first_pos in repeats:
        by_shard.setdefault(shard, []).append((pos, first_shard, first_pos))
    kept_sources: dict[tuple[int, int], str] = {}
    for first_shard in sorted({fs for rows in by_shard.values() for _, fs, _ in rows}):  # each kept shard read once
        sources = load_stats(out, names[first_shard])["sources"]
        kept_sources.update({(first_shard, fp): sources[fp] for rows in by_shard.values()
                             for _, fs, fp in rows if fs == first_shard})
    for number, rows in sorted(by_shard.items()):
        stats = load_stats(out, names[number])
        drops = {stats["keys"][pos]: {
            "source": stats["sources"][pos], "stage": "dedup", "error": "duplicate", "shard": stats["shard"],
            "message": f"same image (key {stats['keys'][pos]}) as {kept_sources[(fs, fp)]} in shard {names[fs]}"}
            for pos, fs, fp in rows}
        drop_samples(out, stats, drops)
    return set(by_shard)


def _drop_near_duplicates(out: Output, names: list[str], max_distance: int, log) -> set[int]:
    """Perceptual near-duplicates across the build (stages/near_duplicates.py): the first
    in shard and key order stays; the others are removed, naming the kept sample."""
    from ..transform.near_duplicates import find

    def hashes():
        for name in names:
            stats = load_stats(out, name)
            yield from zip(stats["keys"], stats.get("phashes") or [None] * len(stats["keys"]))

    found = find(hashes(), max_distance)
    log(f"near-duplicates (pHash distance <= {max_distance}): {len(found)} removed")
    if not found:
        return set()
    kept_keys = {kept for kept, _ in found.values()}
    where: dict[str, tuple[str, str]] = {}
    touched: set[int] = set()
    for number, name in enumerate(names):
        stats = load_stats(out, name)
        for key, source in zip(stats["keys"], stats["sources"]):
            if key in kept_keys:
                where[key] = (name, source)
            if key in found:
                touched.add(number)
    for number in sorted(touched):
        stats = load_stats(out, names[number])
        drops = {}
        for key, source in zip(stats["keys"], stats["sources"]):
            if key in found:
                kept, distance = found[key]
                shard, kept_source = where[kept]
                drops[key] = {"source": source, "stage": "dedup", "error": "near_duplicate", "shard": stats["shard"],
                              "message": f"looks like key {kept} ({kept_source}, shard {shard}): "
                                         f"pHash distance {distance} <= {max_distance}", "kept": kept}
        drop_samples(out, stats, drops)
    return touched


def _write_errors(out: Output, names: list[str]) -> Counter:
    """errors.jsonl, streamed shard by shard; returns the count of each reason."""
    reasons: Counter = Counter()
    with out.open_atomic("errors.jsonl") as handle:
        for name in names:
            for error in load_stats(out, name)["errors"]:
                handle.write((json.dumps(error, ensure_ascii=False) + "\n").encode("utf-8"))
                reasons[error["error"]] += 1
    return reasons
