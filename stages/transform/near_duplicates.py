"""Near-duplicate detection across a whole build with perceptual hashes (pHash, imagehash).

Each sample's 64-bit pHash is computed while its pixels are decoded and kept in its
shard's stats, so the decision is made once at the end over every shard, also after a
resume. Which copy is kept is deterministic: samples are visited in shard order, then key
order (independent of which worker built what, or when), and a sample within `max_distance`
bits of an earlier kept one is dropped, naming the kept key.

Lookup uses the pigeonhole principle: split the hash into max_distance + 1 blocks; two
hashes that differ in at most max_distance bits agree exactly on at least one block, so
only samples sharing a block are compared (no all-pairs pass over the build).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

HASH_BITS = 64


def phash(image: np.ndarray) -> str:
    """pHash (64 bits, hex) of an H x W x 3 uint8 image."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(image)))


def _blocks(value: int, count: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, HASH_BITS, count + 1).astype(int)
    return [(i, (value >> int(lo)) & ((1 << int(hi - lo)) - 1)) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def find(items: Iterable[tuple[str, str]], max_distance: int) -> dict[str, tuple[str, int]]:
    """`items`: (key, hex pHash) in the order that decides which copy stays.
    Returns {dropped key: (kept key, Hamming distance)}."""
    if not 0 <= max_distance < HASH_BITS // 2:
        raise ValueError(f"near-duplicate distance must be 0..{HASH_BITS // 2 - 1}, got {max_distance}")
    index: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    dropped: dict[str, tuple[str, int]] = {}
    for key, hex_hash in items:
        if hex_hash is None:
            continue
        value = int(hex_hash, 16)
        blocks = _blocks(value, max_distance + 1)
        best = None
        for block in blocks:
            for kept_key, kept_value in index[block]:
                distance = (value ^ kept_value).bit_count()
                if distance <= max_distance and (best is None or distance < best[1]):
                    best = (kept_key, distance)
        if best is not None:
            dropped[key] = best
            continue
        for block in blocks:
            index[block].append((key, value))
    return dropped
