"""Contact sheet of a build: one row per sample, image | each condition | caption."""

from __future__ import annotations

import argparse
import io
import json
import textwrap

from PIL import Image, ImageDraw, ImageFont

from stages.shards.output import Output
from stages.shards.layout import condition_sort_key
from stages.shards.reader import iter_samples


def read_samples(out: Output, n: int) -> list[dict[str, bytes]]:
    """The first n samples in shard order, read from any fsspec output."""
    manifest = json.loads(out.read_text("manifest.json"))
    samples: list[dict[str, bytes]] = []
    for entry in manifest["shards"]:
        with out.fs.open(out.path(entry["name"]), "rb") as handle:
            for _key, members in iter_samples(handle):
                samples.append(members)
                if len(samples) >= n:
                    return samples
    return samples


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def contact_sheet(out: Output | str, n: int = 16, cell: int = 160) -> Image.Image:
    out = out if isinstance(out, Output) else Output(out)
    samples = read_samples(out, n)
    if not samples:
        raise ValueError(f"{out.url}: no samples to preview")
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




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a build's output folder")
    parser.add_argument("-n", type=int, default=16, help="samples to draw (default 16)")
    parser.add_argument("-o", "--out", default=None, help="PNG to write (default OUTPUT/preview.png)")


def run_from_args(args: argparse.Namespace) -> int:
    out = Output(args.output)
    sheet = contact_sheet(out, args.n)
    if args.out:
        sheet.save(args.out)
    else:
        out.write_atomic("preview.png", png_bytes(sheet))
    print(f"wrote {args.out or out.url_of('preview.png')}")
    return 0
