"""A real headless Chromium for tests, driven over the DevTools protocol on a pipe (no extra packages).

Every request that is not file:, data: or to a loopback address fails in the browser (Fetch interception)
and is recorded, DNS maps every name to nothing and the proxy is a closed loopback port: so a page that
renders here renders offline. Also usable by hand: ``python -m tests.browser PAGE.html OUT.png``.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

CANDIDATES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
LOCAL_SCHEMES = ("file", "data", "about", "blob", "chrome", "devtools")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def find_browser() -> str | None:
    return next(filter(None, (shutil.which(c) for c in CANDIDATES)), None)


def _high(fd: int) -> int:
    """`fd` moved to a descriptor >= 10 (close-on-exec, as os.pipe's)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in LOCAL_SCHEMES or parsed.hostname in LOOPBACK


class Browser:
    """One headless Chromium; `open(url)` loads a page with the network blocked and reports what happened."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0, size: tuple[int, int] = (1400, 1000)):
        binary = binary or find_browser()
        if binary is None:
            raise FileNotFoundError(f"no headless browser found (tried {', '.join(CANDIDATES)})")
        self.timeout, self._id, self._buffer = timeout, 0, b""
        self._profile = tempfile.mkdtemp(prefix="align-chromium-")
        # Our ends at fds >= 10, so bash's moves to 3 and 4 below never overwrite one another.
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        to_browser_r, from_browser_w = (_high(fd) for fd in (to_browser_r, from_browser_w))
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            f"--user-data-dir={self._profile}",
            f"--window-size={size[0]},{size[1]}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        # The browser reads commands on fd 3 and writes replies on fd 4: bash moves our pipe ends there
        # (no preexec_fn: running Python in a forked child of a threaded process can deadlock).
        wire = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", wire, "chromium", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w),
            start_new_session=True,  # its own process group: close() can end the renderers with it
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Fetch.enable", session=True, patterns=[{"urlPattern": "*"}])

    # ------------------------------------------------------------------------------------------- protocol

    def _send(self, method: str, session: bool, params: dict) -> int:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        return self._id

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"browser gave no answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise ConnectionError("browser closed the DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command, handling events meanwhile; its result (RuntimeError on a protocol error)."""
        wanted = self._send(method, session, params)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Fetch.requestPaused":
            url = params["request"]["url"]
            if is_local(url):
                self._send("Fetch.continueRequest", True, {"requestId": params["requestId"]})
            else:
                self.blocked.append(url)
                self._send(
                    "Fetch.failRequest", True, {"requestId": params["requestId"], "errorReason": "BlockedByClient"}
                )
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed" and params.get("errorText") != "net::ERR_BLOCKED_BY_CLIENT":
            self.failed.append(params.get("errorText", "?"))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "?"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"{params['entry'].get('text')} ({params['entry'].get('url', '')})")
        elif method == "Page.loadEventFired":
            self._loaded = True

    # ------------------------------------------------------------------------------------------------ use

    def open(self, url: str, settle: float = 0.5) -> None:
        """Load `url` and wait for its load event and `settle` seconds more (scripts that run on ready)."""
        self.requests, self.blocked, self.failed, self.errors, self._loaded = [], [], [], [], False
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + self.timeout
        while not self._loaded:
            self._event(self._read(deadline))
        self.evaluate(f"new Promise(r => setTimeout(r, {int(settle * 1000)}))")
        self.evaluate("document.fonts.ready.then(() => true)")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited); RuntimeError on an exception."""
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        import base64

        params = {"format": "png", "captureBeyondViewport": full_page}
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self._send("Browser.close", False, {})
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    page, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    with Browser() as b:
        b.open(page.as_uri())
        b.screenshot(out, full_page="--full" in sys.argv)
        print(json.dumps({"blocked": b.blocked, "errors": b.errors, "failed": b.failed}, indent=1))
