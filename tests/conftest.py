"""Shared fixtures: generated image folders and an isolated Prefect home for local flow runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.prefect_server import PrefectServer, launch_server

# Before Prefect is imported anywhere: nothing touches a developer's own Prefect profile.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="featurepipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Unit tests call task code outside any flow run: its featurepipe.* log lines are not for the
# session's API, and Prefect would warn about each one.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


SESSION_SERVER = pytest.StashKey[PrefectServer]()


def pytest_configure(config: pytest.Config) -> None:
    """One real Prefect server for the session, booting while the tests are collected. Every
    flow records into it: in this process and in each `featurepipe` child, which otherwise
    starts a temporary server of its own, seconds of CPU per command (benchmarks/README.md)."""
    if "PREFECT_API_URL" not in os.environ:
        server = launch_server(Path(os.environ["PREFECT_HOME"]) / "session-server")
        os.environ["PREFECT_API_URL"] = server.env["PREFECT_API_URL"]
        config.stash[SESSION_SERVER] = server


def cli_env() -> dict[str, str]:
    """The environment of a `featurepipe` child: this session's, TensorFlow and Prefect quiet."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_LOGGING_LEVEL": "WARNING"}


def featurepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the `featurepipe` command as a user would: a real process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_image(path: Path, seed: int, size: int = 24, tint: int = 0) -> Path:
    """A random RGB image whose mean colour depends on `tint`, so classes are separable."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, size=(size, size, 3)) + np.array([tint, 60, 120 - tint])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _session_prefect_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Wait for the session's server before the first test; at the end send Prefect's queued
    logs and events while it still runs and pytest still captures output (left to atexit
    hooks, they go to a stopped server and a closed stream)."""
    server = request.config.stash.get(SESSION_SERVER, None)
    if server is not None:
        server.wait_healthy()
    yield
    if "prefect.logging.handlers" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the session's server, also when the session ended before its first test."""
    server = config.stash.get(SESSION_SERVER, None)
    if server is not None:
        server.stop()


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Two classes x 12 generated PNG images in the flow_from_directory layout."""
    root = tmp_path / "images"
    for label, tint in (("cats", 0), ("dogs", 120)):
        for i in range(12):
            write_image(
                root / label / f"img_{i:02d}.png", seed=100 * (label == "dogs") + i, tint=tint
            )
    return root


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits, 15 per class, as PNG class folders (shared by several tests)."""
    from tasks.data.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), per_class=15)
