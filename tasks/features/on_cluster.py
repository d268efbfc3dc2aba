"""Extraction on a Dask cluster: one task per unit of whole chunks, placed by Dask's scheduler.

Tasks are not pinned, so the scheduler balances them, hands some to a worker that joins late,
and reruns elsewhere what a lost worker had not finished. Each worker process builds the
backbone once (a cache keyed by the settings) and reuses it for all its tasks; each task reads
its own images (paths or URLs travel through the graph, never pixels) and writes its chunks and
their done flags itself, so every worker must reach the data and the store (shared path, S3).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from tasks.backbones.registry import load_preprocess
from tasks.errors import UserError
from tasks.features.extract import (
    ChunkCache,
    ExtractSettings,
    ProgressCallback,
    Unit,
    build_model,
    compute_unit,
    output_widths,
    prefetched,
    resolve_backbone,
    unit_batches,
    unit_writes,
    with_resolved_precision,
)
from tasks.features.store import FeatureStore


@dataclass
class WorkerBackbone:
    """A built feature model with what decoding needs; `predict` is safe from several threads."""

    predict: Callable[[np.ndarray], object]
    image_size: int
    preprocess: Callable
    widths: list[int]  # features per image of each layer


# Per worker process: at most one backbone (a second would double its memory) and one opened
# store per location. A lock, because a worker started with several threads runs tasks at once.
_LOCK = threading.Lock()
_BACKBONES: dict[tuple[str, tuple[str, ...]], WorkerBackbone] = {}
_STORES: dict[str, FeatureStore] = {}
BUILDS = Counter()  # backbones built by this process, per settings (`client.run` reads it)


def worker_threads(host_workers: dict[str, int]) -> int:
    """TensorFlow threads for this worker: the cores of its own machine, shared among the
    workers the client saw on that host (a worker on a host it did not see gets them all)."""
    cores = len(os.sched_getaffinity(0))
    from distributed import get_worker

    try:
        host = urlsplit(get_worker().address).hostname
    except ValueError:  # not inside a worker (called directly)
        host = None
    return max(1, cores // max(1, host_workers.get(host, 1)))


def _set_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: keep its thread pools


def worker_backbone(
    settings: ExtractSettings, layers: Sequence[str], identity: str, threads: int
) -> WorkerBackbone:
    """This process's backbone for the settings, built on first use and then reused.

    The weights are resolved on this machine; if they are not the ones the client resolved
    (another weights file at the same path), the task fails rather than mix features.
    """
    key = (repr(settings), tuple(layers))  # every field: whatever changes the model is in it
    with _LOCK:
        if key not in _BACKBONES:
            spec, weights, size = resolve_backbone(settings)
            if weights.identity != identity:
                raise UserError(
                    f"weights {settings.weights!r} on this worker are not the client's "
                    f"({weights.identity} vs {identity}): install the same weights everywhere"
                )
            _set_threads(threads)
            _BACKBONES.clear()
            model = build_model(spec, weights, size, layers, settings)
            BUILDS[key] += 1
            predict_lock = threading.Lock()

            def predict(batch: np.ndarray, model=model, lock=predict_lock) -> object:
                with lock:
                    return model.predict_on_batch(batch)

            widths = output_widths(model)
            _BACKBONES[key] = WorkerBackbone(predict, size, load_preprocess(spec), widths)
        return _BACKBONES[key]


def _store(location: str) -> FeatureStore:
    with _LOCK:
        if location not in _STORES:
            _STORES[location] = FeatureStore(location)
        return _STORES[location]


def extract_unit(
    unit: Unit,
    location: str,
    settings: ExtractSettings,
    identity: str,
    layers: list[str],
    keys: dict[str, str],
    host_workers: dict[str, int],
) -> int:
    """One Dask task: fill the unit's chunks of every array and mark them done; returns the
    images it computed. A unit whose chunks are all done already (a task rerun after its
    worker died just after finishing it) costs only those flag reads."""
    store = _store(location)
    arrays = [store.feature_array(keys[layer]) for layer in layers]
    pending = zip(arrays, unit.chunks, strict=True)
    if all(array.chunk_done(index) for array, chunks in pending for index in chunks):
        return 0
    backbone = worker_backbone(settings, layers, identity, worker_threads(host_workers))
    decoded = prefetched(
        unit_batches(unit, settings.batch_size),
        backbone.image_size,
        backbone.preprocess,
        settings.decode_workers,
    )
    copier = ChunkCache(store)
    buffers = compute_unit(unit, arrays, backbone.predict, decoded, copier, settings.batch_size)
    for array, index, values in unit_writes(unit, arrays, buffers):
        array.write_chunk(index, values)
    return len(unit.rows)


def _host_workers(client) -> dict[str, int]:
    """Workers per host as the scheduler sees them now (for each worker's thread count)."""
    workers = client.scheduler_info()["workers"].values()
    return dict(Counter(info["host"] for info in workers))


def _widths_task(
    settings: ExtractSettings, identity: str, layers: list[str], host_workers: dict[str, int]
) -> list[int]:
    threads = worker_threads(host_workers)
    return worker_backbone(settings, layers, identity, threads).widths


def cluster_widths(
    client, settings: ExtractSettings, identity: str, layers: Sequence[str]
) -> list[int]:
    """Feature widths from a backbone built on a worker, which keeps it for its units: the
    client never builds one (nor imports TensorFlow) to size the arrays."""
    future = client.submit(_widths_task, settings, identity, list(layers), _host_workers(client))
    return future.result()


def warm_workers(client, settings: ExtractSettings, layers: Sequence[str] | None = None) -> None:
    """Every worker builds the backbone now, as its first unit would: a long-lived cluster's
    first extraction then pays no TensorFlow start-up. `layers`: as the extraction will need
    them (default: the settings' layers, else the backbone's default layer)."""
    settings = with_resolved_precision(settings)
    spec, weights, _ = resolve_backbone(settings)
    layers = list(layers or settings.layers or (spec.default_layer,))
    hosts = _host_workers(client)
    futures = [
        client.submit(
            _widths_task, settings, weights.identity, layers, hosts, workers=[w], pure=False
        )
        for w in client.scheduler_info()["workers"]
    ]
    client.gather(futures)


def run_on_cluster(
    client,
    store: FeatureStore,
    settings: ExtractSettings,
    identity: str,
    layers: Sequence[str],
    keys: dict[str, str],
    units: list[Unit],
    progress: ProgressCallback | None,
) -> int:
    """Submit one task per unit and wait for all; progress moves with every finished unit.

    Returns the images that needed computing when the run started (a unit rerun after a
    worker loss is not counted twice).
    """
    from distributed import as_completed

    if not units:
        return 0
    host_workers = _host_workers(client)
    futures = client.map(
        extract_unit,
        units,
        location=store.location,
        settings=settings,
        identity=identity,
        layers=list(layers),
        keys=keys,
        host_workers=host_workers,
        key=[f"extract-unit-{unit.start}-{os.urandom(4).hex()}" for unit in units],
    )
    rows = {future.key: len(unit.rows) for future, unit in zip(futures, units, strict=True)}
    total, computed = sum(rows.values()), 0
    try:
        for future in as_completed(futures):
            future.result()  # raises the task's error here
            computed += rows[future.key]
            future.release()  # its result is no longer needed: never recomputed if lost
            if progress:
                progress(computed, total)
    except BaseException:
        client.cancel(futures)
        raise
    return computed
