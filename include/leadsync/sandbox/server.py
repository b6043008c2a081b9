"""Running the sandbox: in a background thread (tests, demo) or blocking (the CLI).

Only loopback addresses are ever bound: the sandbox accepts any payload shape it is asked to
validate and must never be reachable from another machine.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from leadsync.sandbox.app import SandboxConfig, SandboxState, create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def check_loopback(host: str) -> str:
    """Returns ``host`` if it is a loopback address, else raises.

    Args:
        host: ``localhost`` or an IP literal.

    Returns:
        The host, unchanged.

    Raises:
        ValueError: The host is not a loopback address.
    """
    if host == "localhost":
        return host
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"sandbox host must be a loopback IP or 'localhost', got {host!r}"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"sandbox only binds loopback addresses, got {host!r}")
    return host


def _url_host(host: str) -> str:
    return f"[{host.strip('[]')}]" if ":" in host else host


class SandboxServer:
    """Runs the sandbox with uvicorn in a background thread on a free loopback port.

    Example::

        with SandboxServer() as sandbox:
            requests.post(f"{sandbox.url}/v25.0/1234567890123456/events", json={...})
            sandbox.state.store.list_events("meta")

    Attributes:
        app: The FastAPI app being served.
        host: The bound loopback address.
        port: The bound port (known after ``__enter__``).
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        app: FastAPI | None = None,
        host: str = DEFAULT_HOST,
        port: int = 0,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 10.0,
    ) -> None:
        """Prepares the server (nothing runs until ``__enter__``).

        Args:
            config: Sandbox configuration (ignored when ``app`` is given).
            app: An app from :func:`create_app` to serve instead of building one.
            host: Loopback address to bind.
            port: Port to bind; 0 picks a free one.
            startup_timeout: Seconds to wait for ``GET /_sandbox/health``.
            shutdown_timeout: Seconds to wait for the server thread on exit.
        """
        self.host = check_loopback(host)
        self.port = port
        self._owns_app = app is None
        self.app = app if app is not None else create_app(config)
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def state(self) -> SandboxState:
        """The served app's shared state (store, faults, config)."""
        state: SandboxState = self.app.state.sandbox
        return state

    def start(self) -> SandboxServer:
        """Binds, starts the server thread and waits until it answers the health probe.

        Returns:
            ``self``.

        Raises:
            RuntimeError: The server did not become healthy within ``startup_timeout``.
        """
        if self._thread is not None:
            raise RuntimeError("SandboxServer is already running")
        host = "127.0.0.1" if self.host == "localhost" else self.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(
            self.app,
            log_config=None,  # never reconfigure the host process's logging
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"leadsync-sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        health = f"{self.url}/_sandbox/health"
        while True:
            thread = self._thread
            if thread is None or not thread.is_alive():
                raise RuntimeError("sandbox server thread exited during startup")
            try:
                with urllib.request.urlopen(health, timeout=1.0) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sandbox did not answer {health} in {self._startup_timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Asks uvicorn to exit, joins the thread and releases the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self._shutdown_timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(self._shutdown_timeout)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        self._server = None
        self._socket = None

    def close(self) -> None:
        """Stops the server and, when this object built the app, closes its store."""
        self.stop()
        if self._owns_app:
            self.state.close()

    def __enter__(self) -> SandboxServer:
        """Starts the server; see :meth:`start`."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the server; see :meth:`close`."""
        self.close()


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    config: SandboxConfig | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serves the sandbox in the foreground until interrupted (``leadsync sandbox``).

    Args:
        host: Loopback address to bind.
        port: Port to bind.
        config: Sandbox configuration (defaults: in-memory store, the sandbox token and pixel).
        **uvicorn_options: Extra ``uvicorn.run`` options (e.g. ``log_level``).

    Raises:
        ValueError: ``host`` is not a loopback address.
    """
    check_loopback(host)
    app = create_app(config)
    options: dict[str, Any] = {"log_level": "warning", "access_log": False}
    options.update(uvicorn_options)
    print(  # the banner is the CLI's only output while it runs
        f"leadsync sandbox listening on http://{_url_host(host)}:{port} (Ctrl+C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=host.strip("[]"), port=port, **options)
    finally:
        app.state.sandbox.close()
