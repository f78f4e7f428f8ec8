"""A shard's finished samples on the worker's local disk.

The writer task annotates one sample at a time and appends its tar members (image,
caption, metadata, conditions, latents) to this file, so a task holds one sample's
conditions at a time, never a shard's worth; the tar is then assembled from here in
key order. The file lives in the system temporary folder (`TMPDIR`) and is deleted
when closed, by the task that made it.
"""

from __future__ import annotations

import tempfile
from typing import Iterable, Iterator


class SampleSpool:
    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="controlforge-spool-")
        self._members: dict[str, list[tuple[str, int, int]]] = {}  # key -> (name, offset, size)
        self._end = 0

    def add(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        if key in self._members:
            raise ValueError(f"sample {key} is already in this shard")
        index = []
        self.file.seek(self._end)
        for name, data in members:
            self.file.write(data)
            index.append((name, self._end, len(data)))
            self._end += len(data)
        self._members[key] = index

    def keys(self) -> list[str]:
        return list(self._members)

    def members(self, key: str) -> Iterator[tuple[str, bytes]]:
        """One sample's members, one read each (a member is at most a few MB)."""
        for name, offset, size in self._members[key]:
            self.file.seek(offset)
            data = self.file.read(size)
            if len(data) != size:
                raise OSError(f"spool file is short: member {name} wants {size} bytes at {offset}, got {len(data)}")
            yield name, data

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SampleSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
