"""Headless Chromium for tests of the Dagster UI, driven through chromedriver's W3C WebDriver API.

No Selenium: the dozen WebDriver calls a test needs are plain HTTP (httpx). ``Browser`` starts
``chromedriver`` on a free port in its own session, opens one headless Chromium with a fixed window
size, and offers what a UI test needs: ``open(url, expect=...)`` (load a page, wait until every expected
text is shown, fail at once on an error page), ``click_text``, ``text()`` (the page's rendered text),
``console_errors()``, ``screenshot(path, crop=...)``. ``Browser.from_env()`` skips the test on a
developer machine without Chromium and fails it in CI.

Waiting for text, rather than a fixed ``--virtual-time-budget``, is what keeps these tests both quick
and steady: the Dagster UI loads its data in several GraphQL round trips after the page itself.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

# Text that only an error page, an error boundary or a failed query shows.
ERROR_MARKERS = (
    "Something went wrong",
    "can't be displayed",  # the UI's ErrorBoundary: "Sorry, <region> can't be displayed."
    "can\u2019t be displayed",
    "Please report this error to the Dagster team",
    "Unexpected GraphQL error",
    "unexpected error while fetching data",
    "An unexpected exception was thrown",
    "PythonError",
    "Page not found",
    "404 Not Found",
    "Asset not found",
    "Partition not found",
)

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)

# The W3C name of the key every element reference is under.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class BrowserError(AssertionError):
    """The page showed an error, redirected away, or never showed what was expected."""


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` executables, from ``$CHROMIUM`` / ``$CHROMEDRIVER`` or PATH."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        return None
    return chromium, driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _xpath_literal(text: str) -> str:
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ', "\'", '.join(f"'{part}'" for part in text.split("'")) + ")"


class Browser:
    """One headless Chromium window behind a private chromedriver. Use as a context manager."""

    def __init__(
        self,
        chromium: str,
        chromedriver: str,
        *,
        window: tuple[int, int] = (1440, 900),
        log_dir: Path | None = None,
    ) -> None:
        self.chromium = chromium
        self.chromedriver = chromedriver
        self.window = window
        self.profile = Path(tempfile.mkdtemp(prefix="ui-browser-profile-"))
        self.log_path = (log_dir or self.profile) / "chromedriver.log"
        self.port = _free_port()
        self._driver: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120.0)
        self.session: str | None = None
        self.visited: list[tuple[str, float]] = []  # (url, seconds until its expected text showed)

    @classmethod
    def from_env(cls, **options: Any) -> Browser:
        """A started ``Browser``; skips the test without Chromium (fails it when ``CI`` is set)."""
        import pytest

        found = find_chromium()
        if found is None:
            reason = "chromium and chromedriver are needed for UI tests (Debian: chromium, chromium-driver)"
            if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
                pytest.fail(f"{reason} (CI=true, so this is an error, not a skip)", pytrace=False)
            pytest.skip(reason)
        return cls(*found, **options).start()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Browser:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._driver = subprocess.Popen(
            [self.chromedriver, f"--port={self.port}", f"--log-path={self.log_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if self._http.get("/status").json()["value"].get("ready"):
                    break
            if self._driver.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"chromedriver did not start; see {self.log_path}")
            time.sleep(0.05)
        width, height = self.window
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": self._binary(),
                "args": [
                    *CHROMIUM_ARGS,
                    f"--user-data-dir={self.profile / 'data'}",
                    f"--window-size={width},{height}",
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
            "pageLoadStrategy": "normal",
        }
        try:
            answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        except Exception:
            self.close()
            raise
        self.session = answer["sessionId"]
        return self

    def _binary(self) -> str:
        """Debian's ``/usr/bin/chromium`` is a shell wrapper; chromedriver wants the real binary."""
        real = Path("/usr/lib/chromium/chromium")
        if Path(self.chromium).resolve() == Path("/usr/bin/chromium") and real.exists():
            return str(real)
        return self.chromium

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                self._http.delete(f"/session/{self.session}", timeout=20)
            self.session = None
        if self._driver is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._driver.pid, signal.SIGTERM)
            try:
                self._driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._driver.pid, signal.SIGKILL)
                self._driver.wait(timeout=10)
            # Chromium's own processes are in the driver's session; make sure none outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._driver.pid, signal.SIGKILL)
            self._driver = None
        self._http.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- WebDriver calls -------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(
            method, path, json=body if body is not None else ({} if method == "POST" else None)
        )
        data = response.json()
        value = data.get("value") if isinstance(data, dict) else None
        if response.status_code >= 400 or (
            isinstance(value, dict) and "error" in value and "message" in value
        ):
            raise BrowserError(f"WebDriver {method} {path} -> {response.status_code}: {value}")
        return value

    def _s(self, path: str) -> str:
        assert self.session is not None, "the browser is not started"
        return f"/session/{self.session}{path}"

    def execute(self, script: str, *args: Any) -> Any:
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    @property
    def url(self) -> str:
        return str(self._call("GET", self._s("/url")))

    def text(self) -> str:
        """The page's rendered text (``document.body.innerText``), dialogs included."""
        return str(self.execute("return document.body ? document.body.innerText : '';"))

    def dom(self) -> str:
        return str(self.execute("return document.documentElement.outerHTML;"))

    def console_errors(self) -> list[str]:
        """Console messages of level SEVERE since the last call (chromedriver's browser log)."""
        try:
            entries = self._call("POST", self._s("/se/log"), {"type": "browser"})
        except BrowserError:
            return []
        return [str(entry.get("message")) for entry in entries or [] if entry.get("level") == "SEVERE"]

    # -- what tests use --------------------------------------------------------------------------

    def error_markers(self, text: str | None = None) -> list[str]:
        text = self.text() if text is None else text
        return [marker for marker in ERROR_MARKERS if marker in text]

    def wait_for_text(
        self,
        expect: Iterable[str],
        *,
        timeout: float = 45.0,
        what: str = "",
        forbid: Sequence[str] = (),
        until: Callable[[str], bool] | None = None,
    ) -> str:
        """Wait until the page shows every text in ``expect`` (and ``until(text)`` holds, if given);
        return the page's text.

        Raises ``BrowserError`` at once when an error marker (or a text in ``forbid``) shows, and on
        timeout with what the page showed instead."""
        wanted = list(expect)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            errors = self.error_markers(text) + [f for f in forbid if f in text]
            if errors:
                raise BrowserError(f"{what or self.url}: the page shows {errors}:\n{text[:4000]}")
            missing = [w for w in wanted if w not in text]
            if until is not None and not until(text):
                missing.append(f"<{getattr(until, '__name__', 'until')}>")
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"{what or self.url}: not shown within {timeout:.0f}s: {missing}\n"
                    f"the page ({self.url}) shows:\n{text[:4000]}"
                )
            time.sleep(0.25)

    def open(
        self,
        url: str,
        expect: Iterable[str],
        *,
        timeout: float = 45.0,
        forbid: Sequence[str] = (),
        until: Callable[[str], bool] | None = None,
    ) -> str:
        """Load ``url``, check the UI did not redirect elsewhere (it sends unknown routes to
        ``/overview``), and wait until every ``expect`` text shows; return the page's text."""
        started = time.monotonic()
        self._call("POST", self._s("/url"), {"url": url})
        text = self.wait_for_text(expect, timeout=timeout, what=url, forbid=forbid, until=until)
        wanted_path = urlsplit(url).path.rstrip("/")
        landed = urlsplit(self.url).path.rstrip("/")
        if landed != wanted_path:
            raise BrowserError(f"{url}: the UI redirected to {self.url}; page text:\n{text[:2000]}")
        self.visited.append((url, time.monotonic() - started))
        return text

    def find(self, xpath: str, *, timeout: float = 10.0) -> str:
        """The first element matching ``xpath`` (waited for); returns its WebDriver reference."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._call("POST", self._s("/elements"), {"using": "xpath", "value": xpath})
            if found:
                return str(found[0][ELEMENT])
            if time.monotonic() > deadline:
                raise BrowserError(f"no element matches {xpath} on {self.url}:\n{self.text()[:3000]}")
            time.sleep(0.2)

    def click(self, xpath: str, *, timeout: float = 10.0) -> None:
        element = self.find(xpath, timeout=timeout)
        self._call("POST", self._s(f"/element/{element}/click"))

    def click_text(self, text: str, *, tag: str = "*", timeout: float = 10.0) -> None:
        """Click the innermost ``tag`` element whose own text is exactly ``text`` (spaces trimmed)."""
        self.click(f"//{tag}[normalize-space(text())={_xpath_literal(text)}]", timeout=timeout)

    def resize(self, width: int, height: int) -> None:
        """Resize the window (in headless mode the viewport follows it)."""
        self._call("POST", self._s("/window/rect"), {"width": width, "height": height})

    def scroll_to(self, xpath: str) -> None:
        element = self.find(xpath)
        self.execute("arguments[0].scrollIntoView({block: 'start'});", {ELEMENT: element})

    def screenshot(
        self, path: Path, *, crop: tuple[int, int, int, int] | None = None, colors: int | None = None
    ) -> Path:
        """Save the window as PNG; ``crop`` is ``(left, top, right, bottom)`` in pixels, ``colors``
        reduces the palette (octree, which keeps small status dots in their colour) so committed
        screenshots stay small."""
        from PIL import Image

        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        image = Image.open(io.BytesIO(png)).convert("RGB")
        if crop is not None:  # clipped to the window's real viewport
            left, top, right, bottom = crop
            image = image.crop((left, top, min(right, image.width), min(bottom, image.height)))
        if colors:
            image = image.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        return path
