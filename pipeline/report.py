"""`controlforge report OUT`: one HTML page about a build, to look at what was made.

OUT/report.html shows the sample count, the rejected inputs by reason with a few examples
of each, the worker seconds per stage, histograms of condition coverage and caption length
(over every sample, from the per-shard stats), and a paged grid of samples with every
condition and the caption. It needs no network: styles and script are inline, the grid's
thumbnails are small JPEG strips in OUT/report/ (image | each condition), drawn for an even
spread of at most `--samples` samples, so a build of 100k samples still opens at once.
Every build writes it at the end (build --report-samples 0 turns that off).
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from stages.shards.output import Output
from stages.shards.layout import condition_sort_key
from stages.shards.manifest import load_manifest, load_stats
from stages.shards.reader import iter_samples

REPORT_DIR = "report"
EXAMPLES_PER_REASON = 3


class ReportError(ValueError):
    pass


COVERAGE_BINS = 20  # histogram bins over [0, 1]


def collect(out: Output) -> dict[str, Any]:
    """Everything the page shows except the thumbnails, read as a stream: the manifest, each
    shard's stats in turn, errors.jsonl line by line. Per-sample figures are kept as
    histogram counts, not lists, so memory does not grow with the build."""
    manifest = load_manifest(out)
    if manifest is None:
        raise ReportError(f"{out.url}: no manifest.json: not a build folder (or the build has not written a shard yet)")
    reasons: Counter = Counter()
    examples: dict[str, list[dict]] = defaultdict(list)
    if out.exists("errors.jsonl"):
        with out.open_read("errors.jsonl") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    e = {"error": "unreadable_line", "source": f"errors.jsonl line {number}", "message": line[:200]}
                reason = e.get("error", "unknown")
                reasons[reason] += 1
                if len(examples[reason]) < EXAMPLES_PER_REASON:
                    examples[reason].append({k: str(e.get(k, "")) for k in ("source", "stage", "message")})
    seconds: Counter = Counter()
    coverage: dict[str, list[int]] = {}
    caption_words: Counter = Counter()
    caption_sources: Counter = Counter()
    for entry in manifest["shards"]:
        s = load_stats(out, Path(entry["name"]).stem)
        seconds.update(s.get("seconds", {}))
        for name, values in s.get("coverage", {}).items():
            counts = coverage.setdefault(name, [0] * COVERAGE_BINS)
            for v in values:
                if v is not None:
                    counts[min(COVERAGE_BINS - 1, max(0, int(v * COVERAGE_BINS)))] += 1
        caption_words.update(s.get("caption_words", []))
        caption_sources.update(s.get("caption_sources", []))
    conditions = sorted({c for entry in manifest["shards"] for c in entry.get("conditions", [])}
                        or manifest["config"].get("conditions", []), key=condition_sort_key)
    return {"samples": sum(e["samples"] for e in manifest["shards"]), "shards": len(manifest["shards"]),
            "inputs": manifest.get("inputs"), "complete": manifest.get("complete", False),
            "rejected": sum(reasons.values()), "reasons": dict(reasons.most_common()), "examples": dict(examples),
            "seconds": dict(sorted(seconds.items())), "coverage": coverage,
            "caption_words": dict(sorted(caption_words.items())),
            "caption_sources": dict(caption_sources.most_common()), "conditions": conditions,
            "config": manifest.get("config", {})}


def pick(shards: list[dict], limit: int) -> dict[str, int]:
    """How many samples to show from the start of each shard: an even spread, `limit` in all."""
    total = sum(s["samples"] for s in shards)
    if total <= limit:
        return {s["name"]: s["samples"] for s in shards}
    per_shard = max(1, math.ceil(limit / max(1, len(shards))))
    taken, left = {}, limit
    for s in shards:
        take = min(s["samples"], per_shard, left)
        taken[s["name"]] = take
        left -= take
    return taken


def write_thumbnails(out: Output, manifest: dict, conditions: list[str], limit: int, size: int) -> list[dict]:
    """One JPEG strip per shown sample (image | conditions) in OUT/report/; the grid's rows."""
    from PIL import Image

    for old in list(out.glob(f"{REPORT_DIR}/*.jpg")):
        out.remove(old)
    out.makedirs(REPORT_DIR)
    rows = []
    wanted = pick(manifest["shards"], limit)
    for entry in manifest["shards"]:
        want = wanted.get(entry["name"], 0)
        if not want:
            continue
        shard, shown = Path(entry["name"]).stem, 0
        with out.fs.open(out.path(entry["name"]), "rb") as handle:
            for key, members in iter_samples(handle):
                tiles = [members.get("jpg"), *(members.get(f"{c}.png") for c in conditions)]
                strip = Image.new("RGB", (size * len(tiles), size), "white")
                for i, data in enumerate(tiles):
                    if data is not None:
                        strip.paste(_tile(data, size), (i * size, 0))
                name = f"{REPORT_DIR}/{len(rows):05d}.jpg"
                buf = io.BytesIO()
                strip.save(buf, "JPEG", quality=80)
                out.fs.pipe_file(out.path(name), buf.getvalue())  # rebuilt with the page: no rename needed
                rows.append({"key": key, "shard": shard, "thumb": name,
                             "caption": members.get("txt", b"").decode("utf-8", errors="replace").strip()})
                shown += 1
                if shown >= want:
                    break
    return rows


def _tile(data: bytes, size: int):
    """An image or map scaled to fit size x size: a JPEG is decoded at a reduced scale
    (draft) and everything is scaled before the RGB conversion, so a thumbnail costs a
    fraction of a full decode. Small builds are drawn larger with their pixels kept sharp."""
    from PIL import Image

    tile = Image.open(io.BytesIO(data))
    tile.draft("RGB", (size, size))
    scale = size / max(tile.size)
    target = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
    if tile.mode not in ("RGB", "L"):
        tile = tile.convert("RGB")
    if scale < 1:
        tile = tile.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    else:
        tile = tile.resize(target, Image.Resampling.NEAREST)
    return tile.convert("RGB")


def histogram_svg(counts: list[int], bins: list[float], label: str, width: int = 360, height: int = 140) -> str:
    """A bar chart as inline SVG (no script, no network): counts[i] over [bins[i], bins[i+1])."""
    top = max(counts) or 1
    bar_w = (width - 40) / len(counts)
    bars = []
    for i, n in enumerate(counts):
        h = (height - 30) * n / top
        bars.append(f'<rect x="{30 + i * bar_w:.1f}" y="{height - 20 - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}">'
                    f'<title>{bins[i]:g} to {bins[i + 1]:g}: {n}</title></rect>')
    return (f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="{html.escape(label)}">'
            f'{"".join(bars)}<text x="30" y="{height - 5}">{bins[0]:g}</text>'
            f'<text x="{width - 10}" y="{height - 5}" text-anchor="end">{bins[-1]:g}</text>'
            f'<text x="30" y="12">max {top}</text></svg>')


def render(data: dict[str, Any], rows: list[dict], per_page: int) -> str:
    e = html.escape
    reason_rows = "".join(
        f'<tr data-reason="{e(reason)}"><td>{e(reason)}</td><td class="n">{n}</td><td>'
        + "".join(f'<div class="ex"><b>{e(x["source"])}</b> ({e(x["stage"])}): {e(x["message"])}</div>'
                  for x in data["examples"].get(reason, []))
        + "</td></tr>" for reason, n in data["reasons"].items())
    rejected = (f'<table><tr><th>reason</th><th>inputs</th><th>examples</th></tr>{reason_rows}</table>'
                if data["reasons"] else "<p>No input was rejected.</p>")
    seconds = "".join(f'<tr><td>{e(k)}</td><td class="n">{v:.2f}</td></tr>' for k, v in data["seconds"].items())
    stage_table = (f'<table><tr><th>stage</th><th>worker seconds</th></tr>{seconds}</table>'
                   if seconds else "<p>No stage timings recorded.</p>")
    hists = []
    for name in data["conditions"]:
        counts = data["coverage"].get(name)
        body = (histogram_svg(counts, [i / COVERAGE_BINS for i in range(COVERAGE_BINS + 1)], f"{name} coverage")
                if counts and sum(counts) else "<p>not recorded for this build</p>")
        hists.append(f'<figure><figcaption>{e(name)}: share of non-zero pixels ({sum(counts or [])} samples)'
                     f'</figcaption>{body}</figure>')
    words = data["caption_words"]  # {word count: samples}
    if words:
        top = max(max(words), 1)
        step = max(1, math.ceil((top + 1) / 20))
        bins = list(range(0, top + step + 1, step))
        counts = [sum(n for w, n in words.items() if bins[i] <= w < bins[i + 1]) for i in range(len(bins) - 1)]
        hists.append(f'<figure><figcaption>caption length in words ({sum(words.values())} samples)</figcaption>'
                     f'{histogram_svg(counts, bins, "caption length")}</figure>')
    sources = "; ".join(f"{e(k)} ({v} samples)" for k, v in data["caption_sources"].items()) or "not recorded"
    grid_note = (f"{len(rows)} of {data['samples']} samples shown" + (", spread over the shards" if len(rows) <
                                                                       data["samples"] else ""))
    payload = json.dumps({"rows": rows, "per_page": per_page, "conditions": data["conditions"]}).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>controlforge build report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }} .ex {{ font-size: 12px; color: #555; }}
.counts span {{ display: inline-block; margin-right: 24px; font-size: 18px; }}
figure {{ display: inline-block; margin: 0 16px 16px 0; }} .hist rect {{ fill: #4a78c2; }} .hist text {{ font-size: 10px; }}
#grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 10px; }}
.card {{ border: 1px solid #ddd; padding: 6px; }} .card img {{ max-width: 100%; display: block; }}
.card .cap {{ margin-top: 4px; }} .card .key {{ font-size: 11px; color: #777; }}
</style></head><body>
<h1>Build report</h1>
<p class="counts"><span>samples <b id="samples">{data['samples']}</b></span><span>shards <b id="shards">{data['shards']}</b></span>
<span>inputs <b id="inputs">{data['inputs'] if data['inputs'] is not None else '?'}</b></span><span>rejected <b id="rejected">{data['rejected']}</b></span>
<span>{'complete' if data['complete'] else '<b>incomplete</b> (build still running or stopped)'}</span></p>
<p>Conditions: {e(', '.join(data['conditions']) or 'none')}. Captions from: {sources}.</p>
<h2>Rejected inputs</h2>{rejected}
<h2>Where the time went</h2>{stage_table}
<h2>Coverage and captions</h2>{''.join(hists) or '<p>No per-sample figures recorded.</p>'}
<h2>Samples</h2><p>{e(grid_note)}; each strip: image | {e(' | '.join(data['conditions']))}.</p>
<p><button id="prev">previous</button> <span id="page"></span> <button id="next">next</button></p>
<div id="grid"></div>
<script type="application/json" id="data">{payload}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("data").textContent);
  const grid = document.getElementById("grid"), label = document.getElementById("page");
  const pages = Math.max(1, Math.ceil(data.rows.length / data.per_page));
  let page = 0;
  function show(p) {{
    page = Math.min(Math.max(p, 0), pages - 1);
    grid.replaceChildren();
    for (const row of data.rows.slice(page * data.per_page, (page + 1) * data.per_page)) {{
      const card = document.createElement("div"); card.className = "card";
      const img = document.createElement("img"); img.src = row.thumb; img.alt = row.key; img.loading = "lazy";
      const cap = document.createElement("div"); cap.className = "cap"; cap.textContent = row.caption || "(no caption)";
      const key = document.createElement("div"); key.className = "key"; key.textContent = row.key + " in shard " + row.shard;
      card.append(img, cap, key); grid.append(card);
    }}
    label.textContent = "page " + (page + 1) + " of " + pages;
  }}
  document.getElementById("prev").onclick = function () {{ show(page - 1); }};
  document.getElementById("next").onclick = function () {{ show(page + 1); }};
  show(0);
}})();
</script></body></html>
"""


def write_report(out: Output | str, samples: int = 1000, per_page: int = 48, thumb: int = 96) -> str:
    """Write OUT/report.html (and its thumbnails); returns its URL."""
    out = out if isinstance(out, Output) else Output(out)
    data = collect(out)
    manifest = load_manifest(out)
    rows = write_thumbnails(out, manifest, data["conditions"], samples, thumb) if samples else []
    out.write_atomic("report.html", render(data, rows, per_page).encode("utf-8"))
    return out.url_of("report.html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a build's output folder (local or fsspec URL)")
    parser.add_argument("--samples", type=int, default=1000, help="samples in the grid, spread over the shards "
                        "(default 1000; 0 = figures only)")
    parser.add_argument("--per-page", type=int, default=48, help="samples per grid page (default 48)")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels (default 96)")


def run_from_args(args: argparse.Namespace) -> int:
    import sys

    try:
        url = write_report(args.output, args.samples, max(1, args.per_page), args.thumb)
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {url}")
    return 0
