"""Reading samples back out of a shard tar, streamed (preview, report, verify, publish)."""

from __future__ import annotations

import tarfile
from typing import IO, Iterator


def iter_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member extension: bytes}) in tar order; raises on a truncated or corrupt tar."""
    key, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            name_key, _, ext = member.name.partition(".")
            if name_key != key and key is not None:
                yield key, members
                members = {}
            key = name_key
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members
