"""One build per output folder: OUT/.controlforge.lock records who builds there.

The lock holds host, pid, start time and a heartbeat time that a thread refreshes while
the build runs. A second build is refused at once with that information. A lock whose
holder is gone is taken over with a warning: on the same host when its pid is dead, on
another host when its heartbeat is older than `stale_seconds`. Locally the lock file is
created atomically (O_EXCL); on object stores (S3) there is no atomic create, so the
lock is written and read back (the last writer wins, and the loser sees it is not its
own): enough to stop the everyday mistake of starting a build twice.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from .output import Output

LOCK_NAME = ".controlforge.lock"


class LockedError(RuntimeError):
    """Another live build holds the output folder."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class BuildLock:
    def __init__(self, out: Output, stale_seconds: float = 3600.0, log: Callable[[str], Any] = print,
                 heartbeat_seconds: float | None = None):
        self.out, self.stale_seconds, self.log = out, stale_seconds, log
        self.heartbeat_seconds = heartbeat_seconds or max(1.0, min(60.0, stale_seconds / 4))
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- who holds it ------------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.out.read_text(LOCK_NAME))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"host": "?", "pid": -1, "started": 0, "heartbeat": 0, "token": "unreadable"}

    def holder_gone(self, holder: dict[str, Any]) -> str | None:
        """Why the holder no longer builds, or None if it may still."""
        if holder.get("host") == self.record["host"]:
            return None if pid_alive(int(holder.get("pid", -1))) else f"its process {holder.get('pid')} is gone"
        age = time.time() - float(holder.get("heartbeat", holder.get("started", 0)))
        if age > self.stale_seconds:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_seconds:g} s)"
        return None

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {_when(float(holder.get('started', 0)))}, "
                f"last heartbeat {_when(float(holder.get('heartbeat', 0)))}")

    # -- taking and giving back ------------------------------------------------------------
    def _write(self, exclusive: bool) -> bool:
        data = json.dumps(self.record).encode()
        if self.out.local:
            path = self.out.path(LOCK_NAME)
            if exclusive:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                return True
        self.out.write_atomic(LOCK_NAME, data)
        return True

    def acquire(self) -> "BuildLock":
        self.out.makedirs()
        for _ in range(3):
            holder = self.read()
            if holder is None:
                if not self._write(exclusive=True):
                    continue  # someone created it between our read and write: look again
            else:
                gone = self.holder_gone(holder)
                if gone is None:
                    raise LockedError(f"{self.out.url} is being built by another run ({self.describe(holder)}); "
                                      f"wait for it, stop it, or use another --output. If that run is dead on "
                                      f"another machine, remove {self.out.url_of(LOCK_NAME)}")
                self.log(f"warning: taking over the lock of a build that stopped ({self.describe(holder)}: {gone})")
                self._write(exclusive=False)
            if not self.out.local:
                self.out.fs.invalidate_cache()
            if (self.read() or {}).get("token") == self.record["token"]:
                self._thread = threading.Thread(target=self._beat, daemon=True, name="controlforge-lock")
                self._thread.start()
                return self
        raise LockedError(f"{self.out.url}: could not take the build lock (another build started at the same time)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if (self.read() or {}).get("token") != self.record["token"]:
                self.log(f"warning: the build lock of {self.out.url} was taken by another run")
                return
            self.record["heartbeat"] = time.time()
            self._write(exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self.read() or {}).get("token") == self.record["token"]:
            self.out.remove(LOCK_NAME)

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
