"""The end-of-build table: what went in, what came out, what was rejected and why, where the time went."""

from __future__ import annotations

from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    rejected = summary["rejected"]
    stage_seconds = summary["stage_seconds"]
    built = summary["samples_built"]
    wall = summary["wall_seconds"]
    rows = [
        ("inputs", f"{summary['inputs']}"),
        ("samples written", f"{summary['samples']}"),
        ("rejected", f"{sum(rejected.values())}"),
        *((f"  {reason}", f"{n}") for reason, n in sorted(rejected.items())),
        ("shards", f"{summary['shards']} ({summary['shards_built']} built now, "
                   f"{summary['shards'] - summary['shards_built']} already done)"),
        ("listing seconds", f"{summary['list_seconds']:.2f}"),
        *((f"  {stage} (worker s)", f"{sec:.2f}") for stage, sec in sorted(stage_seconds.items())),
        ("wall seconds", f"{wall:.2f}"),
        ("images/s", f"{built / wall:.1f}" if wall > 0 else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "build summary", "-" * (width + 14)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    if rejected:
        lines.append("(each rejected input has one line in errors.jsonl: source, stage, error, message)")
    return "\n".join(lines)
