"""The writer: shard tars, per-shard stats, and the output folder's index files
(manifest.json, errors.jsonl, wids-index.json) as ../shared/SCHEMA.md lays them out.

Everything lands under a temporary name first and is renamed when whole, so a
killed build never leaves a half file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .shard import Sample, ShardWork

SCHEMA_VERSION = 1
SHARDS_DIR = "shards"
#: member order inside a sample; later conditions sort after these by name
CONDITION_ORDER = ("canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart")


def condition_sort_key(name: str) -> tuple[int, str]:
    return (CONDITION_ORDER.index(name) if name in CONDITION_ORDER else len(CONDITION_ORDER), name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def remove_stale_temporaries(out: Path) -> int:
    """Temporaries of a killed run: never final, safe to delete on restart."""
    removed = 0
    for folder in (out, out / SHARDS_DIR):
        if folder.is_dir():
            for path in folder.glob("*.tmp-*"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def sample_json(sample: Sample, build_seed: int) -> dict[str, Any]:
    meta = dict(sample.meta)  # fields the input had (img2dataset's url, status, ...) stay
    meta.update({
        "key": sample.key,
        "source": sample.source,
        "sha256": sample.sha256,
        "orig_width": sample.orig_width,
        "orig_height": sample.orig_height,
        "width": sample.width,
        "height": sample.height,
        "caption_model": sample.caption_model,
        "conditions": {name: sample.condition_info[name] for name in sorted(sample.conditions, key=condition_sort_key)},
        "seed": build_seed,
    })
    return meta


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed: the same build gives the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_tar_bytes(samples: Iterable[Sample], build_seed: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in sorted(samples, key=lambda s: s.key):
            _tar_member(tar, f"{sample.key}.jpg", sample.jpg)
            _tar_member(tar, f"{sample.key}.txt", (sample.caption or "").replace("\n", " ").encode("utf-8"))
            _tar_member(tar, f"{sample.key}.json", json.dumps(sample_json(sample, build_seed), sort_keys=True).encode())
            for name in sorted(sample.conditions, key=condition_sort_key):
                _tar_member(tar, f"{sample.key}.{name}.png", sample.conditions[name])
    return buf.getvalue()


def write_shard(out: Path, work: ShardWork, build_seed: int, conditions: list[str]) -> dict[str, Any]:
    """Write `shards/NAME.tar` and `shards/NAME_stats.json`; returns the stats."""
    shards = out / SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    samples = sorted(work.samples, key=lambda s: s.key)
    data = shard_tar_bytes(samples, build_seed)
    atomic_write_bytes(shards / f"{work.name}.tar", data)
    seconds = {**work.seconds, "write": time.perf_counter() - start}
    stats = {
        "shard": work.name,
        "inputs": len(work.inputs),
        "samples": len(samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "conditions": sorted(conditions, key=condition_sort_key),
        "rejected": dict(sorted(Counter(e["error"] for e in work.errors).items())),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "counters": dict(sorted(work.counters.items())),
        "keys": [s.key for s in samples],
        "sources": [s.source for s in samples],
        "errors": work.errors,
    }
    atomic_write_json(shards / f"{work.name}_stats.json", stats)
    return stats


# ------------------------------------------------------------ output index ---


def manifest_entry(stats: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"{SHARDS_DIR}/{stats['shard']}.tar", "samples": stats["samples"], "bytes": stats["bytes"],
            "sha256": stats["sha256"], "conditions": stats["conditions"]}


def load_manifest(out: Path) -> dict[str, Any] | None:
    path = out / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def load_stats(out: Path, shard: str) -> dict[str, Any]:
    return json.loads((out / SHARDS_DIR / f"{shard}_stats.json").read_text())


def write_wids_index(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(out / "wids-index.json", {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": e["name"], "nsamples": e["samples"], "filesize": e["bytes"]} for e in manifest["shards"]],
    })


def write_errors(out: Path, all_stats: list[dict[str, Any]]) -> int:
    lines = [json.dumps(err, ensure_ascii=False) for stats in all_stats for err in stats["errors"]]
    atomic_write_bytes(out / "errors.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return len(lines)


def drop_cross_shard_duplicates(out: Path, all_stats: list[dict[str, Any]], build_seed: int) -> list[dict[str, Any]]:
    """The same picture reached from two shards stays in the earlier shard only.

    Idempotent: a rerun after a kill finds nothing left to drop in shards
    already rewritten. Returns the stats of every shard that changed.
    """
    first_seen: dict[str, tuple[str, str]] = {}
    changed = []
    for stats in sorted(all_stats, key=lambda s: s["shard"]):
        drop = {}
        for key, source in zip(stats["keys"], stats["sources"]):
            if key in first_seen:
                drop[key] = source
            else:
                first_seen[key] = (stats["shard"], source)
        if not drop:
            continue
        tar_path = out / SHARDS_DIR / f"{stats['shard']}.tar"
        data = _filter_tar(tar_path.read_bytes(), set(drop))
        for key, source in drop.items():
            shard, kept = first_seen[key]
            stats["errors"].append({"source": source, "stage": "dedup", "error": "duplicate",
                                    "message": f"same image (key {key}) as {kept} in shard {shard}", "shard": stats["shard"]})
        keep = [i for i, k in enumerate(stats["keys"]) if k not in drop]
        stats["keys"] = [stats["keys"][i] for i in keep]
        stats["sources"] = [stats["sources"][i] for i in keep]
        stats.update(samples=len(keep), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     rejected=dict(sorted(Counter(e["error"] for e in stats["errors"]).items())))
        atomic_write_bytes(tar_path, data)
        atomic_write_json(out / SHARDS_DIR / f"{stats['shard']}_stats.json", stats)
        changed.append(stats)
    return changed


def _filter_tar(data: bytes, drop_keys: set[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src:
            if member.name.split(".", 1)[0] not in drop_keys:
                _tar_member(dst, member.name, src.extractfile(member).read())
    return out.getvalue()
