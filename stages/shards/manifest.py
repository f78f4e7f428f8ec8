"""A build's index: manifest.json, the shards' completion markers (NAME_stats.json) and
wids-index.json, read and written (layout: docs/SCHEMA.md). Resume, verify, publish,
the report and the end of a build all find finished shards through here."""

from __future__ import annotations

import json
from typing import Any

from .layout import MANIFEST, SHARDS_DIR, STATS_SUFFIX, stats_path, tar_path
from .output import Output, write_json


def manifest_entry(stats: dict[str, Any]) -> dict[str, Any]:
    return {"name": tar_path(stats["shard"]), "samples": stats["samples"], "bytes": stats["bytes"],
            "sha256": stats["sha256"], "conditions": stats["conditions"]}


def load_manifest(out: Output) -> dict[str, Any] | None:
    return json.loads(out.read_text(MANIFEST)) if out.exists(MANIFEST) else None


def save_manifest(out: Output, manifest: dict[str, Any]) -> None:
    write_json(out, MANIFEST, manifest)


def load_stats(out: Output, shard: str) -> dict[str, Any]:
    return json.loads(out.read_text(stats_path(shard)))


def completed_shards(out: Output) -> set[str]:
    """Names of the shards whose completion marker (NAME_stats.json, written after the tar
    is in place) exists: one fresh listing of shards/, however many shards."""
    listed = set(out.glob(f"{SHARDS_DIR}/*"))
    return {name[len(SHARDS_DIR) + 1:-len(STATS_SUFFIX)] for name in listed
            if name.endswith(STATS_SUFFIX) and name[:-len(STATS_SUFFIX)] + ".tar" in listed}


def manifest_from_markers(out: Output, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's shard list from the completion markers (on demand: verify, the end
    of a build); entries the manifest already has for other shards are kept."""
    entries = {e["name"]: e for e in manifest.get("shards", [])}
    for name in completed_shards(out):
        entries[tar_path(name)] = manifest_entry(load_stats(out, name))
    return {**manifest, "shards": [entries[k] for k in sorted(entries)]}


def write_wids_index(out: Output, manifest: dict[str, Any]) -> None:
    write_json(out, "wids-index.json", {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": e["name"], "nsamples": e["samples"], "filesize": e["bytes"]} for e in manifest["shards"]],
    })


def remove_stale_temporaries(out: Output) -> int:
    """Temporaries of a killed run: never final, safe to delete on restart."""
    stale = [*out.glob("*.tmp-*"), *out.glob(f"{SHARDS_DIR}/*.tmp-*")]
    for rel in stale:
        out.remove(rel)
    return len(stale)
