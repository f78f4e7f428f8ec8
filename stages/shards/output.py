"""A build's output folder on any fsspec filesystem: a local path, memory://, s3://, gs://...

Every file is written under a temporary name and moved into place when whole: on a
local disk with fsync and an atomic rename; on object stores the final object only
appears once its upload has completed (move = server-side copy of a whole object)."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Output:
    def __init__(self, url: str):
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """What a reader (webdataset, datasets, Ray) opens: a plain path locally, else a URL."""
        return self.path(rel) if self.local else self.fs.unstrip_protocol(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def refresh(self) -> None:
        """Forget cached listings (s3fs keeps them): another process may have written since."""
        if not self.local:
            self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        self.refresh()
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        self.refresh()
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_atomic(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as handle:
            handle.write(data)

    @contextmanager
    def open_atomic(self, rel: str) -> Iterator[IO[bytes]]:
        """A file to stream into (a shard tar need never sit in memory whole): written
        under a temporary name and moved into place only when the block exits cleanly;
        on an error the temporary is removed and the final name is left as it was."""
        final = self.path(rel)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                with open(tmp, "wb") as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, final)
            else:
                with self.fs.open(tmp, "wb") as handle:  # s3fs: a multipart upload, block by block
                    yield handle
                self.fs.mv(tmp, final)
        except BaseException:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except Exception:  # the original error matters more; restarts remove temporaries anyway
                pass
            raise

    def open_read(self, rel: str) -> IO[bytes]:
        self.refresh()
        return self.fs.open(self.path(rel), "rb")

    def glob(self, pattern: str) -> Iterator[str]:
        """Relative names matching pattern (relative to the root)."""
        prefix = len(self.root) + 1
        self.refresh()
        for found in self.fs.glob(self.path(pattern)):
            yield found[prefix:] if found.startswith(self.root) else found

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def move(self, src: str, dst: str) -> None:
        self.fs.mv(self.path(src), self.path(dst))


def write_json(out: Output, rel: str, obj) -> None:
    """An indented JSON file, written atomically (manifest, stats, indexes)."""
    import json

    out.write_atomic(rel, (json.dumps(obj, indent=1) + "\n").encode())
