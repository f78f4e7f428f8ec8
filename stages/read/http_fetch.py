"""Fetching one image over HTTP(S) the way a crawler must: connect and read timeouts, a
deadline for the whole body (a server that trickles bytes cannot hold a worker), retries
with backoff for transient failures only, a user agent naming the tool, and optionally
the opt-outs img2dataset honours (`X-Robots-Tag: noai` / `noimageai`) and the TDM
Reservation Protocol's `tdm-reservation: 1` header, on by default. No connection
reaches a link-local or cloud-metadata address (address_guard), redirects included.

Failures raise FetchError with a reason name the build records in errors.jsonl and the
shard stats: `timeout`, `http_error` (with the status), `connection_error`, `too_large`,
`opted_out`, `blocked_address`.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from .address_guard import AddressGuard, BlockedAddress, blocked_in, guarded_adapter, parse_networks

USER_AGENT = "controlforge/0.1 (ControlNet training-set builder; +https://github.com/controlforge/controlforge)"
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
OPT_OUT_TOKENS = ("noai", "noimageai")


@dataclass(frozen=True)
class HttpOptions:
    timeout: float = 10.0  # seconds to connect, and seconds without a byte while reading
    retries: int = 2  # further tries after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    user_agent: str = USER_AGENT
    respect_opt_out: bool = True  # skip responses with X-Robots-Tag noai / noimageai or tdm-reservation: 1
    max_bytes: int = 100 * 1024 * 1024
    allow_addresses: tuple[str, ...] = ()  # CIDR ranges opened through the address guard

    @property
    def guard(self) -> AddressGuard:
        return AddressGuard(parse_networks(self.allow_addresses))

    @property
    def deadline(self) -> float:
        """The longest one try may take, body included."""
        return 6 * self.timeout


class FetchError(IOError):
    def __init__(self, reason: str, message: str, transient: bool = False):
        super().__init__(message)
        self.reason, self.transient = reason, transient


_local = threading.local()


def _session(guard: AddressGuard):
    """One connection pool per worker thread and guard (requests sessions are not
    thread-safe); every connection it opens passes `guard`."""
    import requests

    sessions = _local.__dict__.setdefault("sessions", {})
    if guard not in sessions:
        session = requests.Session()
        adapter = guarded_adapter(guard)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        sessions[guard] = session
    return sessions[guard]


def opted_out(headers) -> str | None:
    """The header that opts the image out of AI training, or None: X-Robots-Tag with noai or
    noimageai (alone, in a list, or after any bot's name: honoured whichever bot it names),
    or the TDM Reservation Protocol's `tdm-reservation: 1` (W3C TDMRep)."""
    if not headers:
        return None
    robots = headers.get("X-Robots-Tag", "")
    if any(token in OPT_OUT_TOKENS for token in re.split(r"[\s,:]+", robots.lower())):
        return f"X-Robots-Tag: {robots}"
    if headers.get("tdm-reservation", "").strip() == "1":
        return "tdm-reservation: 1"
    return None


def _get_once(url: str, options: HttpOptions) -> bytes:
    import requests

    started = time.monotonic()
    try:
        response = _session(options.guard).get(url, timeout=(options.timeout, options.timeout), stream=True,
                                  headers={"User-Agent": options.user_agent})
    except BlockedAddress as exc:  # the URL, or a redirect from it, leads to instance metadata
        raise FetchError("blocked_address", str(exc)) from None
    except requests.exceptions.Timeout as exc:
        raise FetchError("timeout", f"no answer within {options.timeout:g} s ({type(exc).__name__})", True) from None
    except requests.exceptions.RequestException as exc:
        blocked = blocked_in(exc)
        if blocked is not None:  # found at connect time (a name that answered differently)
            raise FetchError("blocked_address", str(blocked)) from None
        raise FetchError("connection_error", f"{type(exc).__name__}: {exc}", True) from None
    with response:
        if response.status_code >= 400:
            raise FetchError("http_error", f"HTTP {response.status_code} {response.reason or ''}".strip(),
                             response.status_code in TRANSIENT_STATUS)
        why = opted_out(response.headers) if options.respect_opt_out else None
        if why:
            raise FetchError("opted_out", f"{why} (--no-respect-opt-out fetches it anyway)")
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(64 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > options.max_bytes:
                    raise FetchError("too_large", f"more than {options.max_bytes} bytes")
                if time.monotonic() - started > options.deadline:
                    raise FetchError("timeout", f"body not complete within {options.deadline:g} s", True)
        except requests.exceptions.RequestException as exc:  # read timeouts and resets mid-body
            reason = "timeout" if "timed out" in str(exc).lower() else "connection_error"
            raise FetchError(reason, f"while reading: {type(exc).__name__}", True) from None
    return b"".join(chunks)


def http_get(url: str, options: HttpOptions = HttpOptions(), sleep=time.sleep) -> bytes:
    """The body of `url`; retries transient failures with exponential backoff."""
    for attempt in range(options.retries + 1):
        try:
            return _get_once(url, options)
        except FetchError as exc:
            if not exc.transient or attempt == options.retries:
                if attempt:
                    exc.args = (f"{exc.args[0]} (after {attempt + 1} tries)",)
                raise
            sleep(options.backoff * 2 ** attempt)
    raise AssertionError("unreachable")
