"""A real `prefect server start` for tests: its own PREFECT_HOME and port, stopped by process group.

Subprocesses (CLI, worker, `prefect deploy`, served flows) get `server.env`, so everything they
record lands in this server and nothing touches a developer's own Prefect profile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.s3 import free_port

T = TypeVar("T")
PREFECT = str(Path(sys.executable).parent / "prefect")


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.TransportError:  # a busy server (SQLite, 2 shared cores) answers late
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def start_process(
    args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen:
    """Start a long-running process in its own group, so stopping it also stops its children."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the whole group (served flow runs, uvicorn), then SIGKILL what is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@dataclass
class PrefectServer:
    """A running server and the environment that points Prefect clients at it."""

    url: str
    env: dict[str, str]
    process: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One API call; a 503 (SQLite busy on 2 loaded cores) is retried a few times."""
        for attempt in range(5):
            response = httpx.request(method, f"{self.url}/api{path}", json=body, timeout=60)
            if response.status_code != 503 or attempt == 4:
                break
            time.sleep(2 * (attempt + 1))
        response.raise_for_status()
        return response.json() if response.content else None

    def filter(self, kind: str, body: dict | None = None) -> list[dict]:
        """`POST /api/<kind>/filter`, e.g. kind="flow_runs" with a filter body."""
        return self.request("POST", f"/{kind}/filter", body or {})

    def stop(self) -> None:
        stop_process(self.process)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Return once `/api/health` answers; stop the server and fail if it never does."""

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/api/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, timeout, "prefect server /api/health")
        except BaseException:
            self.stop()
            raise


def launch_server(home: Path) -> PrefectServer:
    """Start `prefect server start` on a free port with PREFECT_HOME=`home`, without waiting
    for it: the caller does other work while it boots, then calls `wait_healthy`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log = home / "server.log"
    process = start_process(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log
    )
    return PrefectServer(url, env, process, log)


def start_server(home: Path, timeout: float = 120.0) -> PrefectServer:
    """Start `prefect server start` on a free port with PREFECT_HOME=`home`; wait until healthy."""
    server = launch_server(home)
    server.wait_healthy(timeout)
    return server
