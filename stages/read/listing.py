"""What a build reads, cut into shards. A single URL list (txt, csv, tsv, parquet, jsonl;
local or on S3) is streamed: rows are read in batches and handed out shard by shard as
they are read, so the first shard starts at once and the driver's memory does not grow
with the list (its rows are assigned in file order). Anything else (folders, globs,
several inputs, shards, datasets) is listed whole and sorted, as before.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .readers import LIST_EXTS, InputRef, _fs, iter_url_table, list_inputs
from ..work import ShardWork, plan_shards


@dataclass
class Listing:
    works: Iterable[ShardWork]  # a generator when streamed
    digest: str  # identifies the listing: a resume must see the same one
    streamed: bool
    first: list[InputRef]  # the first inputs (decisions made before reading on)
    known_count: int | None  # inputs, when listed whole
    planned: list[str] = field(default_factory=list)  # shard names handed out so far
    read: int = 0  # inputs handed out so far

    @property
    def count(self) -> int:
        return self.known_count if self.known_count is not None else self.read


def is_streamed(specs: list[str]) -> bool:
    return len(specs) == 1 and specs[0].lower().endswith(LIST_EXTS) and not specs[0].startswith("hf:")


def open_listing(specs: list[str], url_column: str, caption_column: str, samples_per_shard: int,
                 peek: int = 65) -> Listing:
    if not is_streamed(specs):
        refs = list_inputs(specs, url_column, caption_column)
        works = plan_shards(refs, samples_per_shard)
        listing = Listing(works, hashlib.sha256("\n".join(r.source for r in refs).encode()).hexdigest(), False,
                          refs[:peek], len(refs))
        listing.planned = [w.name for w in works]
        return listing
    spec = specs[0]
    fs, path = _fs(spec)
    if not fs.exists(path):
        from .readers import InputError

        raise InputError(f"{spec}: list file does not exist")
    digest = hashlib.sha256(f"{spec}\n{fs.ukey(path)}".encode()).hexdigest()  # size/mtime/etag: no full read
    rows = iter_url_table(spec, url_column, caption_column)
    first = list(itertools.islice(rows, peek))
    if not first:
        from .readers import InputError

        raise InputError(f"{spec}: the list holds no rows")
    listing = Listing(iter(()), digest, True, first, None)
    listing.works = _stream(listing, itertools.chain(first, rows), samples_per_shard)
    return listing


def _stream(listing: Listing, rows: Iterator[InputRef], size: int) -> Iterator[ShardWork]:
    for index in itertools.count():
        chunk = list(itertools.islice(rows, size))
        if not chunk:
            return
        work = ShardWork(index, chunk)
        listing.planned.append(work.name)
        listing.read += len(chunk)
        yield work
