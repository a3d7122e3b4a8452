"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no driver, no
websocket, no package beyond the standard library. Used by the browser test and bench/edge_export.py.

    with Chromium() as browser:
        page = browser.open("http://127.0.0.1:8000/web/")
        page.wait_for("window.privoffload && window.privoffload.state.ready === false")
        page.set_files("#file", ["cat.png"])
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# the closed network refuses what Chromium does in the background; these keep it quiet (and the test quick)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class ChromiumError(RuntimeError):
    pass


class Chromium:
    def __init__(self, executable: str | None = None, width: int = 1100, height: int = 700, timeout: float = 30):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise ChromiumError("chromium is not installed")
        self.size, self.timeout = (width, height), timeout
        self.next_id, self.buffer, self.events = 0, b"", []

    def __enter__(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # the protocol's pipes must be the child's fds 3 (commands in) and 4 (answers out): bash moves them there
        # from fds above any it could clobber (sh may not redirect fds above 9; preexec_fn is unsafe with threads)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        move = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", move, self.executable, *FLAGS,
             f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            pass_fds=ends, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        for fd in ends:
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it and the processes it started (its own session)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

    # ---- the protocol: JSON messages, each ended by a NUL byte

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float | None = None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise ChromiumError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise ChromiumError("chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise ChromiumError("chromium closed the pipe (did it crash?)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Log.enable")
        page.call("Emulation.setDeviceMetricsOverride", {"width": self.size[0], "height": self.size[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        page.call("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def eval(self, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression (promises awaited), as JSON."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                           timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise ChromiumError(f"{expression[:60]}: {details.get('exception', {}).get('description', details.get('text'))}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.eval(f"!!({expression})"):
                    return
            except ChromiumError:
                pass  # the page is still loading
            if time.monotonic() > deadline:
                text = self.eval("document.body ? document.body.innerText.slice(-400) : ''")
                raise ChromiumError(f"waited {timeout} s for {expression!r}; the page says: {text!r}; "
                                    f"its console: {self.console()[-5:]}")
            time.sleep(0.05)

    def console(self) -> list[str]:
        """What the page logged: console messages, uncaught exceptions, the browser's own warnings (CSP...)."""
        out = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(d.get("exception", {}).get("description", d.get("text", "")))
            elif e.get("method") == "Log.entryAdded":
                out.append(p.get("entry", {}).get("text", ""))
        return out

    def set_files(self, selector: str, files: list[str | Path]) -> None:
        """Choose files in an <input type=file>, as a user does (its change event fires)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(f).resolve()) for f in files]})

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
