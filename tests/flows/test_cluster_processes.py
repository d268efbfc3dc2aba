"""A cluster as in real life: `dask scheduler` and two `dask worker` processes, each in its own
working directory, images and feature store on an S3 API (moto's server on loopback), and
`featurepipe run --dask-address` end to end; once undisturbed, once with a worker SIGKILLed in
the middle of the extraction, once with a worker SIGKILLed in the middle of the PCA. All must
equal a run without any cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.features.store import FeatureStore
from tests.conftest import cli_env, write_image
from tests.floats import assert_features_close
from tests.s3 import free_port, moto_s3, upload

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DATA = "s3://features/images"
# 32 images at 64 px, cut at block2_pool and averaged: one image per chunk (chunk_mb below a
# row), so the extraction is 32 tasks and a worker can be killed between two of them.
SETTINGS = {
    "backbone": "vgg16",
    "weights": "none",
    "layers": ["block2_pool"],
    "image_size": 64,
    "pooling": "avg",
    "batch_size": 4,
    "chunk_mb": 0.0001,
    "classifiers": ["logreg"],
    "variance": 0.9,
}


@dataclass
class Reference:
    """A run without a cluster: its summary and where its store is."""

    summary: dict
    store: str
    config: Path
    env: dict[str, str]  # S3 endpoint and credentials, the session's Prefect server


def _featurepipe(
    config: Path, env: dict[str, str], store: str, runs: Path, *extra: str
) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "featurepipe"), "run", "--config", str(config), "--data", DATA]
        + ["--store", store, "--runs", str(runs), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _summary(process: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # e.g. waiting forever for a task pinned to a dead worker
        process.wait()
        raise
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """Images on S3 and the same pipeline run in one process (no Dask cluster). Every run
    records into the session's Prefect server (tests/conftest.py)."""
    work = tmp_path_factory.mktemp("cluster-processes")
    with pytest.MonkeyPatch.context() as patch, moto_s3(patch):
        env = cli_env()  # after moto: it has the endpoint
        for i in range(32):
            label, tint = ("red", 0) if i % 2 else ("blue", 120)
            write_image(work / "images" / label / f"{i:02d}.png", seed=i, size=32, tint=tint)
        upload(work / "images", DATA)
        config = work / "settings.yaml"
        config.write_text(yaml.safe_dump(SETTINGS))
        store = str(work / "local-store")
        summary = _summary(_featurepipe(config, env, store, work / "runs"))
        yield Reference(summary, store, config, env)


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen]
    add_worker: Callable[[str], subprocess.Popen]  # start one more worker with this name


@pytest.fixture(scope="module")
def cluster(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A scheduler and two workers, separate processes in separate folders (no nanny, so
    a worker's pid is the worker itself). Shared by the tests below, the kill test last."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = reference.env
    processes = []

    def start(name: str, *args: str) -> subprocess.Popen:
        folder = tmp_path / name
        folder.mkdir()
        log = open(folder / "log.txt", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [str(BIN / "dask"), *args], cwd=folder, env=env, stdout=log, stderr=log
        )
        processes.append(process)
        return process

    start(
        "scheduler",
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-address",
        ":0",
    )

    def add_worker(name: str) -> subprocess.Popen:
        return start(
            f"worker-{name}", "worker", address, "--nthreads", "1", "--no-nanny", "--name", name
        )

    workers = [add_worker(f"w{i}") for i in range(2)]
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    try:
        yield Cluster(address, workers, add_worker)
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait()


def _assert_same_results(summary: dict, reference: Reference, store: str) -> None:
    assert summary["accuracy"] == reference.summary["accuracy"]
    assert summary["n_components"] == reference.summary["n_components"]
    ours, theirs = FeatureStore(store), FeatureStore(reference.store)
    keys = [
        json.loads((Path(s["run_dir"]) / "report.json").read_text())["keys"]
        for s in (summary, reference.summary)
    ]
    assert keys[0] == keys[1]  # same manifest, features and reduction keys
    features = keys[0]["features"]
    assert_features_close(
        ours.feature_array(features).data[...], theirs.feature_array(features).data[...]
    )
    reduced, _ = ours.load_reduction(keys[0]["reduction"])
    expected, _ = theirs.load_reduction(keys[0]["reduction"])
    assert reduced.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_allclose(reduced[name], values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_run_on_a_cluster_of_processes_equals_a_local_run(
    reference: Reference, cluster: Cluster, tmp_path: Path
) -> None:
    store = "s3://features/cluster-store"
    run = _featurepipe(
        reference.config, reference.env, store, tmp_path / "runs", "--dask-address", cluster.address
    )
    summary = _summary(run)
    assert summary["images_computed"] == 32
    _assert_same_results(summary, reference, store)


def test_worker_killed_mid_extraction(
    reference: Reference, cluster: Cluster, tmp_path: Path
) -> None:
    import s3fs

    store = "s3://features/killed-store"
    run = _featurepipe(
        reference.config, reference.env, store, tmp_path / "runs", "--dask-address", cluster.address
    )
    fs = s3fs.S3FileSystem()
    flags = f"{store.removeprefix('s3://')}/features/*/done/c/*"
    deadline = time.time() + 240
    while len(done := fs.glob(flags, refresh=True)) < 2:  # some chunks written, most not
        assert run.poll() is None and time.time() < deadline, "extraction never started"
        time.sleep(0.05)
    cluster.workers[0].send_signal(signal.SIGKILL)
    before = {path: fs.info(path)["LastModified"] for path in done}
    summary = _summary(run)
    assert cluster.workers[0].wait() == -signal.SIGKILL
    assert len(before) < 32  # the kill landed mid-extraction
    # chunks finished before the kill were kept, not written again; the rest were done elsewhere
    assert {path: fs.info(path, refresh=True)["LastModified"] for path in done} == before
    assert len(fs.glob(flags, refresh=True)) == 32
    _assert_same_results(summary, reference, store)


def test_worker_killed_mid_pca(reference: Reference, cluster: Cluster, tmp_path: Path) -> None:
    """Runs after the extraction kill: a third worker replaces the lost one, then the worker
    running or holding a task of the reduce stage's passes (keyed "pca-...", see
    tasks/reduce/_passes.py) is SIGKILLed as soon as one is seen: the other worker, with
    Dask's recomputation of what was lost, must finish the PCA with the same results."""
    from distributed import Client

    def pca_task_workers(dask_scheduler) -> list[str]:  # runs on the scheduler
        names = []
        for ts in dask_scheduler.tasks.values():
            if ts.prefix.name.startswith("pca-"):
                holders = [ts.processing_on] if ts.processing_on else list(ts.who_has or ())
                names += [ws.name for ws in holders]
        return names

    processes = {f"w{i}": worker for i, worker in enumerate(cluster.workers)}
    processes["w2"] = cluster.add_worker("w2")
    store = "s3://features/pca-killed-store"
    with Client(cluster.address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        run = _featurepipe(
            reference.config,
            reference.env,
            store,
            tmp_path / "runs",
            "--dask-address",
            cluster.address,
        )
        deadline = time.time() + 240
        while not (busy := client.run_on_scheduler(pca_task_workers)):
            assert run.poll() is None and time.time() < deadline, "no PCA task seen"
            time.sleep(0.01)
        victim = processes[busy[0]]
        victim.send_signal(signal.SIGKILL)
    summary = _summary(run)
    assert victim.wait() == -signal.SIGKILL
    _assert_same_results(summary, reference, store)
