"""Aspect-ratio buckets: a fixed set of (width, height) sizes per resolution, so that a
trainer can batch pictures of one shape together instead of cropping them all square.

For resolution R the buckets keep the short side at R and give the long side R x a for a
in ASPECTS, cut down to a multiple of 64 (what SD-family UNets and VAEs divide evenly),
in landscape and portrait. A `keep_ratio` build (short side R) records each sample's
bucket: the largest one whose aspect does not exceed the image's, so the bucket fits in the
stored image by cropping the long side only.
"""

from __future__ import annotations

ASPECTS = (1.0, 1.25, 4 / 3, 1.5, 16 / 9, 2.0, 2.5, 3.0)
MULTIPLE = 64


def buckets(resolution: int) -> list[tuple[int, int]]:
    """Every (width, height) bucket for this resolution, square first."""
    sizes: list[tuple[int, int]] = []
    for aspect in ASPECTS:
        long = max(resolution, int(resolution * aspect) // MULTIPLE * MULTIPLE)
        for size in ((long, resolution), (resolution, long)):
            if size not in sizes:
                sizes.append(size)
    return sizes


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The largest bucket with the image's orientation that fits inside width x height
    (after the short side is scaled to `resolution`)."""
    scale = resolution / min(width, height)
    w, h = width * scale, height * scale
    fitting = [(bw, bh) for bw, bh in buckets(resolution) if bw <= w + 0.5 and bh <= h + 0.5]
    return max(fitting, key=lambda b: b[0] * b[1]) if fitting else (resolution, resolution)
