"""URL inputs against real loopback servers: one that accepts connections and never
answers, HTTP errors, a flaky one that recovers, and an X-Robots-Tag opt-out."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import socket
import threading

import pytest
from PIL import Image

from stages.read.http_fetch import FetchError, HttpOptions, http_get, opted_out


def _jpeg(seed: int) -> bytes:
    from conftest import synthetic_image

    buf = io.BytesIO()
    synthetic_image(seed, (96, 96)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


#: each header form that opts an image out, and one that does not (tdm-reservation: 0)
OPT_OUT_ROUTES = {"/noai.jpg": {"X-Robots-Tag": "noindex, noai"}, "/noimageai.jpg": {"X-Robots-Tag": "noimageai"},
                  "/botnoai.jpg": {"X-Robots-Tag": "otherbot: noai"}, "/tdm.jpg": {"tdm-reservation": "1"},
                  "/tdm0.jpg": {"tdm-reservation": "0"}}
OPTED_OUT = ("noai.jpg", "noimageai.jpg", "botnoai.jpg", "tdm.jpg")


class Site:
    """Routes: /ok-N.jpg, /missing.jpg (404), /flaky.jpg (503 twice, then the image), /noai.jpg."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.agents: set[str] = set()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                site.agents.add(self.headers.get("User-Agent", ""))
                headers = {}
                if self.path.startswith("/ok-"):
                    status, body = 200, _jpeg(int(self.path[4:-4]))
                elif self.path == "/flaky.jpg" and site.hits[self.path] <= 2:
                    status, body = 503, b"busy"
                elif self.path == "/flaky.jpg":
                    status, body = 200, _jpeg(50)
                elif self.path in OPT_OUT_ROUTES:
                    status, body, headers = 200, _jpeg(60 + list(OPT_OUT_ROUTES).index(self.path)), OPT_OUT_ROUTES[self.path]
                else:
                    status, body = 404, b"not here"
                self.send_response(status)
                for k, v in {"Content-Type": "image/jpeg", "Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def silent_server():
    """Accepts every connection and never sends a byte (the case that hung builds)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def test_opt_out_header_forms():
    assert opted_out({"X-Robots-Tag": "noai"}) and opted_out({"X-Robots-Tag": "noindex, noimageai"})
    assert opted_out({"X-Robots-Tag": "somebot: noai"}) and opted_out({"tdm-reservation": "1"})
    assert not opted_out({"X-Robots-Tag": "noindex, nofollow"}) and not opted_out({})
    assert not opted_out({"tdm-reservation": "0"})


def test_http_get_retries_transient_errors_and_not_others(site):
    waits = []
    options = HttpOptions(timeout=2, retries=2, backoff=0.1)
    assert Image.open(io.BytesIO(http_get(f"{site.url}/flaky.jpg", options, sleep=waits.append))).size == (96, 96)
    assert site.hits["/flaky.jpg"] == 3 and waits == [0.1, 0.2], "two 503s, backoff doubling"
    with pytest.raises(FetchError) as err:
        http_get(f"{site.url}/missing.jpg", options, sleep=waits.append)
    assert err.value.reason == "http_error" and "404" in str(err.value) and site.hits["/missing.jpg"] == 1
    assert any(agent.startswith("controlforge/") for agent in site.agents)


def test_a_silent_server_times_out_instead_of_hanging():
    with silent_server() as url:
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            error=pytest.raises(FetchError, http_get, f"{url}/x.jpg", HttpOptions(timeout=0.5, retries=1, backoff=0.05))))
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the fetch hung"
    error = result["error"].value
    assert error.reason == "timeout" and "after 2 tries" in str(error)


@pytest.mark.parametrize("respect", [None, False])
def test_build_records_fetch_failures_by_reason_and_keeps_the_rest(site, tmp_path, respect):
    """respect None: the default, which honours every opt-out header form (served for real
    by the loopback site); False: --no-respect-opt-out."""
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    with silent_server() as silent:
        urls = [f"{site.url}/ok-{i}.jpg" for i in range(3)] + [
            f"{site.url}/missing.jpg", f"{site.url}/flaky.jpg", f"{silent}/never.jpg"] + [
            f"{site.url}{route}" for route in OPT_OUT_ROUTES]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        cfg = BuildConfig(input=[str(tmp_path / "urls.txt")], output=str(tmp_path / "out"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0, report_samples=0, fetch_timeout=0.5,
                          fetch_retries=2, **({} if respect is None else {"respect_opt_out": respect}))
        done = {}
        thread = threading.Thread(target=lambda: done.update(summary=run_build(cfg, log=lambda *_: None)))
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), "the build hung on the silent server"
    errors = {json.loads(line)["source"].rsplit("/", 1)[1]: json.loads(line)
              for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()}
    assert errors["never.jpg"]["error"] == "timeout"
    assert errors["missing.jpg"]["error"] == "http_error" and "404" in errors["missing.jpg"]["message"]
    assert "flaky.jpg" not in errors, "retried after two 503s and kept"
    respected = respect is None
    for name in OPTED_OUT:
        if respected:
            assert errors[name]["error"] == "opted_out", name
        else:
            assert name not in errors, f"{name}: --no-respect-opt-out fetches it"
    if respected:
        assert "otherbot: noai" in errors["botnoai.jpg"]["message"] and "tdm-reservation: 1" in errors["tdm.jpg"]["message"]
    assert "tdm0.jpg" not in errors, "tdm-reservation: 0 reserves nothing"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == (5 if respected else 9)
    stats = json.loads((tmp_path / "out" / "shards" / "00000_stats.json").read_text())
    assert stats["rejected"]["timeout"] == 1 and stats["rejected"]["http_error"] == 1
    assert stats["rejected"].get("opted_out", 0) == (4 if respected else 0)


# --- link-local and cloud-metadata addresses (issue 23, item 6) ---------------------------

METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@contextlib.contextmanager
def redirecting_server(target: str):
    """A loopback server that answers every GET with a 302 to `target` (what a stranger's
    URL list can point a build at) and counts its hits."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("address, blocked", [
    ("169.254.169.254", True), ("169.254.0.1", True), ("::ffff:169.254.169.254", True), ("fd00:ec2::254", True),
    ("fe80::1%eth0", True), ("100.100.100.200", True),
    ("127.0.0.1", False), ("::1", False), ("10.0.0.7", False), ("192.168.1.1", False), ("8.8.8.8", False),
    ("fd00:ec2::253", False)])
def test_guard_refuses_link_local_and_metadata_addresses_only(address, blocked):
    from stages.read.address_guard import AddressGuard, parse_networks

    assert (AddressGuard().reason("example.org", address) is not None) is blocked
    opened = AddressGuard(parse_networks(["169.254.0.0/16", "fd00:ec2::/64", "fe80::/10", "100.100.100.200"]))
    assert opened.reason("example.org", address) is None, "--allow-address opens each range"


def test_guard_checks_the_address_the_socket_reached():
    """A name that resolved to loopback when checked but connected elsewhere (DNS rebinding)
    is refused by the peer check after connect."""
    from stages.read.address_guard import AddressGuard, BlockedAddress

    class Connected:
        def getpeername(self):
            return ("169.254.169.254", 80)

    with pytest.raises(BlockedAddress, match=r"rebind\.example \(169\.254\.169\.254\) is in 169\.254\.0\.0/16"):
        AddressGuard().check_peer("rebind.example", Connected())


def test_a_redirect_to_instance_metadata_is_blocked_and_loopback_is_not(site):
    with redirecting_server(METADATA_URL) as (url, hits):
        with pytest.raises(FetchError) as caught:
            http_get(f"{url}/cat.jpg", HttpOptions(timeout=5, retries=2, backoff=0.01))
    assert caught.value.reason == "blocked_address" and not caught.value.transient, "never retried"
    assert "169.254.169.254" in str(caught.value) and hits == ["/cat.jpg"]
    with redirecting_server(f"{site.url}/ok-1.jpg") as (url, _):  # a redirect to loopback is followed
        assert http_get(f"{url}/cat.jpg", HttpOptions(timeout=5)) == _jpeg(1)


def test_names_are_judged_by_what_they_resolve_to(site, monkeypatch):
    """A host name that resolves to a metadata address is refused before any connection;
    metadata.google.internal is refused by name, and --allow-address opens its address."""
    real = socket.getaddrinfo
    names = {"innocent.example": "169.254.169.254", "metadata.google.internal": "127.0.0.1"}

    def getaddrinfo(host, port, *args, **kwargs):
        return real(names.get(host, host), port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = site.url.rsplit(":", 1)[1]
    for host in names:
        with pytest.raises(FetchError) as caught:
            http_get(f"http://{host}:{port}/ok-2.jpg", HttpOptions(timeout=5, retries=0))
        assert caught.value.reason == "blocked_address" and host in str(caught.value)
    opened = HttpOptions(timeout=5, retries=0, allow_addresses=("127.0.0.1/32",))
    assert http_get(f"http://metadata.google.internal:{port}/ok-2.jpg", opened) == _jpeg(2)
    assert site.hits.get("/ok-2.jpg") == 1, "the blocked tries never reached the server"


def test_build_counts_blocked_addresses_and_allow_address_opens_them(site, tmp_path):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    with redirecting_server(METADATA_URL) as (redirect, _):
        urls = [f"{site.url}/ok-{i}.jpg" for i in range(3)] + [f"{redirect}/meta.jpg", "http://169.254.169.254/x.jpg"]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        common = dict(input=[str(tmp_path / "urls.txt")], resolution=64, min_size=64, caption_model="none",
                      executor="local", preview=0, report_samples=0, fetch_timeout=0.5, fetch_retries=0)
        run_build(BuildConfig(output=str(tmp_path / "out"), **common), log=lambda *_: None)
        run_build(BuildConfig(output=str(tmp_path / "open"), allow_address=["169.254.169.254/32"], **common),
                  log=lambda *_: None)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert sorted((e["source"].rsplit("/", 1)[1], e["error"]) for e in errors) == [
        ("meta.jpg", "blocked_address"), ("x.jpg", "blocked_address")]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 3, "the good URLs kept"
    stats = json.loads((tmp_path / "out" / "shards" / "00000_stats.json").read_text())
    assert stats["rejected"]["blocked_address"] == 2
    opened = [json.loads(line)["error"] for line in (tmp_path / "open" / "errors.jsonl").read_text().splitlines()]
    assert len(opened) == 2 and "blocked_address" not in opened, "tried (no metadata server answers here)"


def test_allow_address_is_a_flag_and_a_bad_range_is_named():
    from common.config import ConfigError
    from pipeline.build import build_parser
    from pipeline.config import load_config

    args = build_parser().parse_args(["--allow-address", "169.254.169.254", "--allow-address", "fd00:ec2::/64"])
    assert load_config(None, {"allow_address": args.allow_address}).allow_address == [
        "169.254.169.254/32", "fd00:ec2::/64"]
    with pytest.raises(ConfigError, match="not an address range.*169.254.0/33"):
        load_config(None, {"allow_address": ["169.254.0/33"]})
