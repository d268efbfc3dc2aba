"""A real S3 API for tests: moto's server on loopback, in its own process.

Import the fixture into a test module (`from tests.s3 import s3_endpoint`) to use it there.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Start moto's S3 server, point this process's environment at it (child processes
    inherit it), create the bucket `features`; yield the endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    try:
        deadline = time.time() + 120  # a loaded machine starts it slowly
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("features")
        yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 API on loopback (moto's server mode), with a bucket, for this test only."""
    with moto_s3(monkeypatch) as endpoint:
        yield endpoint


def upload(folder: Path, url: str) -> None:
    """Copy every file below `folder` to `url` (s3://bucket/prefix), keeping relative paths."""
    import s3fs

    fs = s3fs.S3FileSystem()
    prefix = url.removeprefix("s3://").rstrip("/")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
