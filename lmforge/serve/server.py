"""Run the app with uvicorn: in the foreground (`lmforge serve`) or in a background thread (tests, the load
benchmark's self-test, notebooks), on a free port when port=0."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..core.errors import LMForgeError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 120.0) -> float:
    """Poll `url`/health until it answers 200 (seconds waited); raise if `proc` (a Popen running
    `lmforge serve`) exits first or the time runs out."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise LMForgeError(f"`lmforge serve` exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise LMForgeError(f"`lmforge serve` did not answer on {url}/health within {timeout:.0f}s")


class ServerThread:
    """`with ServerThread(app) as server: httpx.get(server.url + "/health")` — uvicorn in a daemon thread.

    Leaving the block asks uvicorn to exit the way Ctrl-C does: it stops accepting connections, lets the
    requests in flight finish, then runs the app's shutdown (which drains the engine)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 graceful_timeout: float | None = 30.0):
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lmforge-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LMForgeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
