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
                elif self.path == "/noai.jpg":
                    status, body, headers = 200, _jpeg(60), {"X-Robots-Tag": "noindex, noai"}
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
    assert opted_out({"X-Robots-Tag": "somebot: noai"})
    assert not opted_out({"X-Robots-Tag": "noindex, nofollow"}) and not opted_out({})


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


@pytest.mark.parametrize("respect", [False, True])
def test_build_records_fetch_failures_by_reason_and_keeps_the_rest(site, tmp_path, respect):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    with silent_server() as silent:
        urls = [f"{site.url}/ok-{i}.jpg" for i in range(3)] + [
            f"{site.url}/missing.jpg", f"{site.url}/flaky.jpg", f"{site.url}/noai.jpg", f"{silent}/never.jpg"]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        cfg = BuildConfig(input=[str(tmp_path / "urls.txt")], output=str(tmp_path / "out"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0, report_samples=0, fetch_timeout=0.5,
                          fetch_retries=2, respect_opt_out=respect)
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
    if respect:
        assert errors["noai.jpg"]["error"] == "opted_out" and "noai" in errors["noai.jpg"]["message"]
    else:
        assert "noai.jpg" not in errors, "the opt-out is off by default"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == (4 if respect else 5)
    stats = json.loads((tmp_path / "out" / "shards" / "00000_stats.json").read_text())
    assert stats["rejected"]["timeout"] == 1 and stats["rejected"]["http_error"] == 1
    assert stats["rejected"].get("opted_out", 0) == (1 if respect else 0)
