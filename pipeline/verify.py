"""`controlforge verify OUT`: check every shard of a build against its manifest.

Checks: file present, byte count and sha256 as recorded; the tar reads to the end;
each sample's members sit together and are complete (jpg, txt, json and every
condition of the build); images decode; condition maps are the image's size; keys
are unique across shards; sample counts match. Exits 1 naming shard, key and
problem on any failure. `--repair` rewrites the manifest entries of shards that
are whole, and removes broken ones from the manifest (moving their files aside)
so that rerunning the same `controlforge build` rebuilds exactly those.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from stages.shards import manifest as index
from stages.shards.layout import STATS_SUFFIX
from stages.shards.reader import iter_samples
from stages.shards.output import Output

REQUIRED = ("jpg", "txt", "json")


@dataclass
class ShardReport:
    name: str
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sha256: str = ""
    size: int = 0

    @property
    def whole(self) -> bool:
        return not self.problems


def _check_sample(key: str, members: dict[str, bytes], conditions: list[str]) -> list[str]:
    missing = [m for m in (*REQUIRED, *(f"{c}.png" for c in conditions)) if m not in members]
    if missing:
        return [f"key {key}: missing {', '.join(missing)}"]
    problems = []
    try:
        image = Image.open(io.BytesIO(members["jpg"]))
        image.load()
        size = image.size
    except Exception as exc:
        return [f"key {key}: image does not decode ({type(exc).__name__}: {exc})"]
    try:
        meta = json.loads(members["json"])
        if meta.get("key") != key:
            problems.append(f"key {key}: json says key {meta.get('key')!r}")
    except ValueError as exc:
        problems.append(f"key {key}: json does not parse ({exc})")
    for cond in conditions:
        try:
            cimg = Image.open(io.BytesIO(members[f"{cond}.png"]))
            cimg.load()
        except Exception as exc:
            problems.append(f"key {key}: {cond}.png does not decode ({type(exc).__name__}: {exc})")
            continue
        if cimg.size != size:
            problems.append(f"key {key}: {cond}.png is {cimg.size[0]}x{cimg.size[1]}, image is {size[0]}x{size[1]}")
    return problems


def check_shard(data: bytes, entry: dict[str, Any], conditions: list[str]) -> ShardReport:
    report = ShardReport(entry["name"], sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if entry.get("bytes") is not None and entry["bytes"] != len(data):
        report.problems.append(f"size {len(data)} bytes, manifest says {entry['bytes']}")
    if entry.get("sha256") and entry["sha256"] != report.sha256:
        report.problems.append("sha256 differs from the manifest")
    finished: set[str] = set()
    try:
        for key, members in iter_samples(io.BytesIO(data)):
            if key in finished:
                report.problems.append(f"key {key}: members not next to each other")
            report.problems.extend(_check_sample(key, members, conditions))
            report.keys.append(key)
            finished.add(key)
    except (tarfile.TarError, EOFError, OSError) as exc:
        report.problems.append(f"tar does not read to the end ({type(exc).__name__}: {exc}): truncated or corrupt")
    if entry.get("samples") is not None and entry["samples"] != len(report.keys):
        report.problems.append(f"{len(report.keys)} samples, manifest says {entry['samples']}")
    return report


def verify(out: str, repair: bool = False, log=print) -> int:
    output = Output(out)
    manifest = index.load_manifest(output)
    if manifest is None:
        log(f"{out}: no manifest.json: not a controlforge build")
        return 1
    if not manifest.get("complete"):  # a build still running or stopped: its shards are in the markers
        manifest = index.manifest_from_markers(output, manifest)
    reports, seen, failures = [], {}, 0
    for entry in manifest["shards"]:
        if not output.exists(entry["name"]):
            report = ShardReport(entry["name"], ["file is missing"])
        else:
            report = check_shard(output.read_bytes(entry["name"]), entry, entry.get("conditions", []))
        for key in report.keys:
            if key in seen:
                report.problems.append(f"key {key}: also in {seen[key]}")
            else:
                seen[key] = entry["name"]
        for problem in report.problems:
            log(f"FAIL {entry['name']}: {problem}")
        failures += len(report.problems)
        reports.append(report)
    total = sum(len(r.keys) for r in reports)
    log(f"{len(reports)} shards, {total} samples checked: "
        + ("all good" if not failures else f"{failures} problem(s) in {sum(not r.whole for r in reports)} shard(s)"))
    if repair and failures:
        _repair(output, manifest, reports, log)
    return 1 if failures else 0


def _repair(output: Output, manifest: dict[str, Any], reports: list[ShardReport], log) -> None:
    broken = [r for r in reports if not r.whole]
    whole = {r.name: r for r in reports if r.whole}
    kept = []
    for entry in manifest["shards"]:
        if entry["name"] in whole:
            report = whole[entry["name"]]
            kept.append({**entry, "samples": len(report.keys), "bytes": report.size, "sha256": report.sha256})
    manifest["shards"] = kept
    manifest["complete"] = False
    for report in broken:  # the tar and its completion marker, so the build redoes the shard
        marker = report.name[: -len(".tar")] + STATS_SUFFIX
        for name in (report.name, marker):
            if output.exists(name):
                output.move(name, name + ".broken")
    index.save_manifest(output, manifest)
    log(f"repaired the manifest; {len(broken)} shard(s) to rebuild (moved aside as *.broken): "
        + ", ".join(r.name for r in broken))
    log("rerun the same `controlforge build` command to rebuild them")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a build's output folder or fsspec URL")
    parser.add_argument("--repair", action="store_true", help="fix the manifest for whole shards; list those to rebuild")


def run_from_args(args: argparse.Namespace) -> int:
    return verify(args.output, args.repair)
