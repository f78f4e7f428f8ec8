"""A full disk (ENOSPC) or a full quota (EDQUOT) as a clear stop: find it in whatever
wraps it, and say in one line where, how much is free there and what to do.

For any long job that writes and resumes (`controlforge build`, training): catch the
job's exception at the top, `find_disk_full(exc)`; when that gives an OSError, print
`disk_full_message(full_path(error, [folders the job writes]), "<progress>", error)`
and exit with DISK_FULL_EXIT (3), with no traceback unless the user asked for one.

    try:
        run()
    except Exception as exc:
        error = find_disk_full(exc)
        if error is None:
            raise
        print("error: " + disk_full_message(full_path(error, [out]), "3 of 8 shards done", error),
              file=sys.stderr)
        return DISK_FULL_EXIT

Ray is understood without being imported: a RayTaskError keeps the worker's exception
as `.cause`; Ray Data wraps it in a UserCodeException whose own cause is lost on the way
back from the worker, and then only the worker's traceback text names it
("OSError: [Errno 28] No space left on device: '...'"), which is read as a last resort.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

__all__ = ["DISK_FULL_EXIT", "DISK_FULL_ERRNOS", "DiskFullError", "find_disk_full", "full_path", "free_bytes",
           "human_bytes", "disk_full_message"]

#: The exit status of a command stopped by a full disk or quota (2 is a usage or input error).
DISK_FULL_EXIT = 3
#: The errors that mean "no room to write": no space on the device, quota exceeded.
DISK_FULL_ERRNOS = tuple(sorted({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}))

_TEXTS = {code: os.strerror(code) for code in DISK_FULL_ERRNOS}
# "[Errno 28] No space left on device" with an optional ": 'the/file'" after it
_IN_TEXT = re.compile(r"\[Errno (?P<code>\d+)\] (?P<text>[^\n:']+)(?:: '(?P<file>[^'\n]+)')?")


class DiskFullError(RuntimeError):
    """A job stopped by a full disk: `str()` is the one line for the user, `error` the
    OSError found, `path` the place that is full. Raised `from` the original exception."""

    exit_code = DISK_FULL_EXIT

    def __init__(self, message: str, error: OSError | None = None, path: str | None = None):
        super().__init__(message)
        self.error, self.path = error, path


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def find_disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in `exc` or in what it wraps, else None.

    Walks `__cause__`, `__context__` and `.cause` (Ray's RayTaskError), breadth first,
    each exception once (cycles end). When none of them is one, the messages are read
    for the text Python gives such an error ("[Errno 28] No space left on device", with
    the file name if it had one) and a fresh OSError with that errno and file is
    returned: Ray Data sends a worker's exception back as text only."""
    if exc is None:
        return None
    seen: set[int] = set()
    queue = [exc]
    chain: list[BaseException] = []
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        chain.append(current)
        if _is_full(current):
            return current
        for link in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(link, BaseException) and id(link) not in seen:
                queue.append(link)
    for current in chain:
        found = _from_text(str(current))
        if found is not None:
            return found
    return None


def _from_text(text: str) -> OSError | None:
    for match in _IN_TEXT.finditer(text):
        code = int(match["code"])
        if code in DISK_FULL_ERRNOS:
            return OSError(code, match["text"].strip(), match["file"]) if match["file"] else OSError(
                code, match["text"].strip())
    for code, words in _TEXTS.items():  # the words without "[Errno N]"
        if words in text:
            return OSError(code, words)
    return None


def _existing(path: str | os.PathLike) -> Path | None:
    """`path` or its nearest folder that exists (a file being written may not yet)."""
    current = Path(path)
    for candidate in (current, *current.parents):
        if candidate.exists():
            return candidate
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space (for this user) on the disk holding `path`, or None when not a local path."""
    where = _existing(path)
    if where is None:
        return None
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def full_path(error: OSError, candidates: Iterable[str | os.PathLike]) -> str | None:
    """Which place is full: the file `error` names if it names one; else, of the local
    folders the job writes (`candidates`, most likely first: the output, then the
    temporary folder), the one on the disk with the least free space (a candidate on the
    same disk as an earlier one counts as that one). None when there is nothing to name."""
    named = error.filename if error.filename is not None else getattr(error, "filename2", None)
    if named is not None:
        return os.fsdecode(named)
    best: tuple[int, str] | None = None
    devices: set[int] = set()
    for candidate in candidates:
        where = _existing(candidate)
        if where is None:
            continue
        try:
            device = os.stat(where).st_dev
        except OSError:
            continue
        if device in devices:
            continue
        devices.add(device)
        free = free_bytes(where)
        if free is not None and (best is None or free < best[0]):
            best = (free, str(candidate))
    return best[1] if best else None


def human_bytes(count: int) -> str:
    """512 bytes, 3.5 MiB, 12.0 GiB."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def disk_full_message(path: str | os.PathLike | None, done: str, error: OSError | None = None,
                      resume: str = "rerun the same command to resume") -> str:
    """One line (no newline): the disk at `path` is full (or the quota, per `error`), the
    free space there now, `done` (the job's progress, e.g. "3 of 8 shards done"), and what
    to do: free space there, then `resume` (how this job picks up where it stopped)."""
    code = error.errno if error is not None and error.errno in DISK_FULL_ERRNOS else errno.ENOSPC
    what = "disk quota exceeded" if code != errno.ENOSPC else "no space left on device"
    if path is None:
        where, free = "", None
    else:
        where, free = f" at {os.fsdecode(path)}", free_bytes(path)
    room = f" ({human_bytes(free)} free there now)" if free is not None else ""
    todo = "raise the quota or free space there" if code != errno.ENOSPC else "free space there"
    return f"disk full: {what}{where}{room}; {done}; {todo}, then {resume}"
