"""A video download cannot be held or flooded, and goes nowhere it should not: hostile HTTP servers on
127.0.0.1 (a body that drips, a huge announced size, a body with no end, redirects to loopback,
private and metadata addresses, a downgrade from https to http). Nothing but 127.0.0.1 is ever
contacted: a refused redirect is refused before its connection."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dagster import instance_for_test

from dagster_runway.emulator import FaultRule
from dagster_runway.media import DownloadError, store_video
from dagster_runway.media.storage import (
    DownloadTimeoutError,
    VideoTooLargeError,
    origin,
    trusted_origins_for,
)
from dagster_runway.retry import RetryPolicy
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import VIDEOS, latest_failure, make_defs, run_until_idle, video_metadata, write_images

HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
BODY = HEAD + os.urandom(64 * 1024)
SECRET = "X-Amz-Signature=deadbeefcafe"
NO_WAIT = RetryPolicy(max_attempts=3, backoff_initial=0)

Route = Callable[[BaseHTTPRequestHandler], None]


class Hostile:
    """A real HTTP(S) server on 127.0.0.1 whose paths misbehave as each test scripts them."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.stop = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                hostile.requests.append(path)
                route = hostile.routes.get(path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # The client hanging up is what a refused body looks like from here.
                with contextlib.suppress(OSError):  # BrokenPipeError, ConnectionResetError, ssl.SSLError
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client hanging up mid-answer is the point of these tests, not an error

        self.httpd = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.port = self.httpd.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.origin = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _video(handler: BaseHTTPRequestHandler, body: bytes = BODY) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "video/mp4")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _redirect(location: str, status: int = 302) -> Route:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


@pytest.fixture
def server() -> Iterator[Hostile]:
    hostile = Hostile()
    yield hostile
    hostile.close()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: the server's context and a client context that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert_file, key_file)
    client_side = ssl.create_default_context(cafile=str(cert_file))
    return server_side, client_side


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# The total deadline


def test_a_dripping_body_ends_at_the_deadline_and_leaves_nothing(tmp_path: Path, server: Hostile) -> None:
    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.send_header("Content-Length", str(len(BODY)))
        handler.end_headers()
        for byte in BODY:
            if server.stop.is_set():
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.05)

    server.routes["/v.mp4"] = drip
    with pytest.raises(DownloadTimeoutError) as info:
        store_video(f"{server.url}/v.mp4?{SECRET}", str(tmp_path / "v.mp4"), retry=NO_WAIT, deadline_s=0.5)
    text = str(info.value)
    assert (
        "download_timeout_s" in text
        and "0.5 s" in text
        and "retries included" in text
        and "bytes received" in text
    )
    assert "deadbeefcafe" not in text
    assert _parts(tmp_path) == []


def test_retries_stop_at_the_deadline_rather_than_wait_past_it(tmp_path: Path, server: Hostile) -> None:
    def busy(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(503)
        handler.send_header("Retry-After", "30")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server.routes["/v.mp4"] = busy
    with pytest.raises(DownloadTimeoutError, match="download_timeout_s.*after 1 attempt"):
        store_video(
            f"{server.url}/v.mp4",
            str(tmp_path / "v.mp4"),
            retry=RetryPolicy(max_attempts=10, backoff_initial=0),
            deadline_s=5.0,
        )
    assert server.requests == ["/v.mp4"]  # one try: waiting 30 s would pass the deadline
    assert _parts(tmp_path) == []


# The size limit


def test_a_huge_content_length_is_refused_before_reading(tmp_path: Path, server: Hostile) -> None:
    sent: list[int] = []

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.send_header("Content-Length", str(50 * 10**9))
        handler.end_headers()
        handler.wfile.write(HEAD)
        handler.wfile.flush()
        sent.append(len(HEAD))
        server.stop.wait(30)  # the rest never comes: only a refusal on the headers ends this

    server.routes["/v.mp4"] = huge
    with pytest.raises(VideoTooLargeError) as info:
        store_video(f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=NO_WAIT, max_bytes=10 * 2**20)
    text = str(info.value)
    assert (
        "50000000000 bytes (Content-Length)" in text and str(10 * 2**20) in text and "max_video_bytes" in text
    )
    assert server.requests == ["/v.mp4"]  # refused, not retried
    assert _parts(tmp_path) == []


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_body_with_no_announced_size_is_cut_at_the_limit(
    tmp_path: Path, server: Hostile, framing: str
) -> None:
    limit = 256 * 1024
    served: list[int] = []

    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        if framing == "chunked":
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        piece = HEAD + bytes(64 * 1024 - len(HEAD))
        total = 0
        while not server.stop.is_set() and total < 100 * limit:
            data = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if framing == "chunked" else piece
            handler.wfile.write(data)
            total += len(piece)
            served.append(total)

    server.routes["/v.mp4"] = endless
    with pytest.raises(VideoTooLargeError) as info:
        store_video(f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=NO_WAIT, max_bytes=limit)
    text = str(info.value)
    assert "no size was announced" in text and f"limit of {limit} bytes" in text and "max_video_bytes" in text
    assert _parts(tmp_path) == []  # the partial file is gone


def test_a_video_within_the_limits_is_stored(tmp_path: Path, server: Hostile) -> None:
    server.routes["/v.mp4"] = _video
    stored = store_video(
        f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=NO_WAIT, max_bytes=len(BODY), deadline_s=60
    )
    assert stored.size == len(BODY) and (tmp_path / "v.mp4").read_bytes() == BODY


# Redirects, hop by hop


def test_a_redirect_within_the_trusted_origin_is_followed(tmp_path: Path, server: Hostile) -> None:
    server.routes["/first"] = _redirect("/second", 307)
    server.routes["/second"] = _redirect(f"{server.url}/v.mp4", 301)
    server.routes["/v.mp4"] = _video
    stored = store_video(f"{server.url}/first", str(tmp_path / "v.mp4"), trusted_origins=[server.origin])
    assert stored.size == len(BODY)
    assert server.requests == ["/first", "/second", "/v.mp4"]


def test_a_redirect_loop_is_cut_at_the_hop_limit(tmp_path: Path, server: Hostile) -> None:
    server.routes["/loop"] = _redirect("/loop")
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        store_video(
            f"{server.url}/loop", str(tmp_path / "v.mp4"), retry=NO_WAIT, trusted_origins=[server.origin]
        )
    assert len(server.requests) == 6
    assert _parts(tmp_path) == []


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        ("https://127.0.0.1:{other}/v.mp4", "resolves to 127.0.0.1"),
        ("https://localhost:{other}/v.mp4", "resolves to "),  # a name counts by what it resolves to
        ("https://169.254.169.254/latest/meta-data/", "resolves to 169.254.169.254"),
        ("https://10.0.0.1/v.mp4", "resolves to 10.0.0.1"),
        ("https://[::1]:{other}/v.mp4", "resolves to ::1"),
        ("http://169.254.169.254/latest/meta-data/", "plain http"),
        ("http://127.0.0.1:{other}/v.mp4", "plain http"),
    ],
)
def test_a_redirect_to_a_private_host_is_refused_before_connecting(
    tmp_path: Path, server: Hostile, target: str, rule: str
) -> None:
    """The first server stands for a public video host (its origin is the one trusted); the redirect it
    sends leads to a loopback, private or metadata address, which is refused before any connection."""
    other = Hostile()
    other.routes["/v.mp4"] = _video
    try:
        location = target.format(other=other.port) + "?" + SECRET
        server.routes["/v.mp4"] = _redirect(location)
        with pytest.raises(DownloadError) as info:
            store_video(
                f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=NO_WAIT, trusted_origins=[server.origin]
            )
        text = str(info.value)
        assert rule in text and "redirect 1 of the video URL" in text
        assert "deadbeefcafe" not in text
        assert server.requests == ["/v.mp4"] and other.requests == []  # never connected to the target
        assert _parts(tmp_path) == []
    finally:
        other.close()


def test_a_redirect_from_https_to_plain_http_is_refused(
    tmp_path: Path, tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_side, client_side = tls_pair
    secure, plain = Hostile(tls=server_side), Hostile()
    plain.routes["/v.mp4"] = _video
    secure.routes["/v.mp4"] = _video
    try:
        with httpx.Client(verify=client_side, timeout=10) as client:
            # https itself works; the downgrade does not, even to an address that is allowed
            stored = store_video(
                f"{secure.url}/v.mp4",
                str(tmp_path / "ok.mp4"),
                client=client,
                trusted_origins=[secure.origin],
            )
            assert stored.size == len(BODY)
            for target in (plain.url, f"http://127.0.0.1:{secure.port}"):
                secure.routes["/down"] = _redirect(f"{target}/v.mp4")
                with pytest.raises(DownloadError, match="from https down to .* over plain http"):
                    store_video(
                        f"{secure.url}/down",
                        str(tmp_path / "v.mp4"),
                        client=client,
                        trusted_origins=[secure.origin, plain.origin],  # even to an origin trusted over http
                    )
        assert secure.requests == ["/v.mp4", "/down", "/down"] and plain.requests == []
        assert not (tmp_path / "v.mp4").exists()
    finally:
        secure.close()
        plain.close()


def test_the_first_url_is_checked_as_well(tmp_path: Path, server: Hostile) -> None:
    server.routes["/v.mp4"] = _video
    with pytest.raises(DownloadError, match="the video URL goes to .*plain http"):
        store_video(f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), trusted_origins=())
    assert server.requests == []


def test_only_a_non_public_api_origin_is_trusted() -> None:
    assert trusted_origins_for("http://127.0.0.1:8765") == {"http://127.0.0.1:8765"}
    assert trusted_origins_for("http://LOCALHOST:9000/v1") == {"http://localhost:9000"}
    assert trusted_origins_for("https://10.1.2.3") == {"https://10.1.2.3:443"}
    assert trusted_origins_for("https://93.184.216.34") == frozenset()  # a public address: nothing is exempt
    assert trusted_origins_for("not a url") == frozenset()
    assert (
        origin("https://Example.com/x") == "https://example.com:443"
        and origin("http://a:81/") == "http://a:81"
    )


# Wired from the pipeline's options


def test_the_pipeline_applies_max_video_bytes_and_names_it(tmp_path: Path, emulator) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_video_bytes=1024)
    with instance_for_test() as instance:
        daemon = LocalDaemon(defs, instance)
        daemon.tick("runway_discovery_sensor")
        run_until_idle(daemon)
        failure = latest_failure(instance, "img00.png")
        assert failure is not None and failure.failure_class in ("download", "runs_exhausted")
        assert video_metadata(instance, "img00.png") is None
        assert emulator.ledger().billed_submissions == 1  # paid once, never again for the refusals
        messages = [
            r.asset_observation.description
            for r in instance.fetch_observations(VIDEOS, limit=50).records
            if r.asset_observation and "max_video_bytes" in (r.asset_observation.description or "")
        ]
        assert (
            messages
            and "over the limit of 1024 bytes" in messages[0]
            and "raise max_video_bytes" in messages[0]
        )
        assert not list((tmp_path / "videos").glob("*.part")) and not list(
            (tmp_path / "videos").glob("*.mp4")
        )


def test_a_download_past_download_timeout_s_fails_retryable_and_the_next_collect_gets_it(
    tmp_path: Path, emulator
) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), download_timeout_s=0.5)
    emulator.add_fault(FaultRule(kind="slow", endpoint="files", delay_seconds=5.0, times=1))
    with instance_for_test() as instance:
        daemon = LocalDaemon(defs, instance)
        daemon.tick("runway_discovery_sensor")
        run_until_idle(daemon)
        meta = video_metadata(instance, "img00.png")
        assert meta is not None and emulator.ledger().billed_submissions == 1
        failures = [
            r.asset_observation.description or ""
            for r in instance.fetch_observations(VIDEOS, limit=50).records
            if r.asset_observation and r.asset_observation.metadata.get("runway/failure_class")
        ]
        assert len(failures) == 1 and "download_timeout_s" in failures[0] and "0.5 s" in failures[0]
