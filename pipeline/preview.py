"""Contact sheet of a build: one row per sample, image | each condition | caption."""

from __future__ import annotations

import argparse
import io
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from stages.writer import condition_sort_key


def read_samples(out: Path, n: int) -> list[dict[str, bytes]]:
    """The first n samples in shard order, read with webdataset as any consumer would."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / e["name"]) for e in manifest["shards"] if e["samples"]]
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    samples = []
    for sample in dataset:
        samples.append(sample)
        if len(samples) >= n:
            break
    return samples


def contact_sheet(out: str | Path, n: int = 16, cell: int = 160) -> Image.Image:
    out = Path(out)
    samples = read_samples(out, n)
    if not samples:
        raise ValueError(f"{out}: no samples to preview")
    conditions = sorted({k[: -len(".png")] for s in samples for k in s if k.endswith(".png")}, key=condition_sort_key)
    text_w = cell * 2
    cols = 1 + len(conditions)
    sheet = Image.new("RGB", (cols * cell + text_w, len(samples) * cell + 20), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for col, title in enumerate(["image", *conditions, "caption"]):
        draw.text((col * cell + 4, 4), title, fill="black", font=font)
    for row, sample in enumerate(samples):
        y = 20 + row * cell
        tiles = [sample["jpg"], *(sample.get(f"{c}.png") for c in conditions)]
        for col, data in enumerate(tiles):
            if data is None:
                continue
            tile = Image.open(io.BytesIO(data)).convert("RGB")
            tile.thumbnail((cell - 4, cell - 4))
            sheet.paste(tile, (col * cell + 2, y + 2))
        caption = sample.get("txt", b"").decode("utf-8", errors="replace")
        draw.multiline_text((cols * cell + 4, y + 4), "\n".join(textwrap.wrap(caption, 36)[:9]), fill="black", font=font)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlforge preview", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a build's output folder")
    parser.add_argument("-n", type=int, default=16, help="samples to draw (default 16)")
    parser.add_argument("-o", "--out", default=None, help="PNG to write (default OUTPUT/preview.png)")


def run_from_args(args: argparse.Namespace) -> int:
    target = Path(args.out or Path(args.output) / "preview.png")
    contact_sheet(args.output, args.n).save(target)
    print(f"wrote {target}")
    return 0
