"""A headless Debian ``chromium`` driven over the Chrome DevTools Protocol (no driver binary).

Installed by the test setup when missing (``apt-get install -y chromium``, as ``make
chromium`` does); with ``CI=true`` a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

IN_CI = os.environ.get("CI", "").lower() == "true"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    """The chromium binary, installed with apt-get when missing (root only)."""
    found = shutil.which("chromium")
    if found:
        return found
    problem = "chromium is not installed"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                                  check=False)
            if proc.returncode:
                problem = f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}"
                break
        found = shutil.which("chromium")
        if found:
            return found
    if IN_CI:
        pytest.fail(f"{problem} — CI requires it (apt-get install -y chromium)", pytrace=False)
    pytest.skip(f"{problem} (apt-get install -y chromium)")


class Chromium:
    """One headless browser with a fresh profile, and one page driven over CDP."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [chromium_path(), *FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (see {self.log.name})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        self.width = width
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Sends one CDP command and returns its result (events in between are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            data = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return dict(data.get("result", {}))

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", url=url, name=name, value=value, path="/")

    def open(self, url: str, settle: float = 0.3, timeout: float = 60) -> None:
        """Navigates and waits for the document to be complete."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.2)
        time.sleep(settle)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page (its whole height when ``full_page``)."""
        height = 900
        if full_page:
            # Measured at the window's own size (an earlier override would pad short pages).
            self.call("Emulation.clearDeviceMetricsOverride")
            time.sleep(0.2)
            height = int(self.evaluate("document.body.scrollHeight") or 900)
        self.call("Emulation.setDeviceMetricsOverride", width=self.width,
                  height=min(max(height, 300), 6000), deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        # The whole process group: chromium's helper processes too.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        self.log.close()
