"""Shared fixtures: generated image folders and an isolated Prefect home for local flow runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Before Prefect is imported anywhere: its local (ephemeral) API keeps its database here.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="featurepipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


CLI_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_LOGGING_LEVEL": "WARNING"}


def featurepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the `featurepipe` command as a user would: a real process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        cwd=cwd,
        env=CLI_ENV,
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
def _stop_prefect_temporary_server():
    """Send Prefect's queued logs and events, then stop its temporary local server, while
    pytest still captures output: left to atexit hooks, the server's last log line goes into a
    closed stream after the summary ('--- Logging error ---')."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
        SubprocessASGIServer().stop()


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
