"""Stream a manifest through a backbone into the feature store, chunk by chunk, resumably.

Decoding runs in a thread pool ahead of inference and chunk writes run in a writer thread, so
the backbone rarely waits. Only chunks whose done flag is missing are computed, which makes a
second run free and a killed run resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.backbones.registry import (
    BackboneSpec,
    WeightsChoice,
    build_feature_model,
    get_spec,
    load_preprocess,
    resolve_weights,
)
from tasks.data.images import RESIZE_METHOD, load_rgb
from tasks.data.scan import Manifest
from tasks.features.store import FeatureArray, FeatureStore

EXTRACT_VERSION = "2"  # bump when a code change alters the features for the same settings
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides which features are computed (plus how fast)."""

    backbone: str = "vgg16"
    weights: str = "imagenet"
    layers: tuple[str, ...] = ()
    image_size: int | None = None
    pooling: str | None = None
    dtype: str = "float32"
    batch_size: int = 16
    seed: int = 0
    decode_workers: int = 2
    chunk_mb: float = 16.0  # storage layout only: not part of the feature key


@dataclass
class ExtractResult:
    """What an extraction produced and how much of it came from the cache."""

    feature_keys: dict[str, str]
    images_total: int
    images_computed: int
    images_cached: int
    seconds: float
    images_per_second: float | None = None
    n_features: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractPlan:
    """Resolved settings and the content key of every requested layer (no TensorFlow needed)."""

    spec: BackboneSpec
    weights: WeightsChoice
    image_size: int
    layers: tuple[str, ...]
    identities: dict[str, dict]

    def key(self, layer: str) -> str:
        return feature_key(self.identities[layer])


def same_settings(attrs: dict, other: dict) -> bool:
    """Whether two feature arrays were extracted with the same settings (any manifests)."""
    fields = (
        "backbone",
        "weights",
        "layer",
        "image_size",
        "pooling",
        "dtype",
        "preprocess",
        "resize",
        "version",
    )
    return all(attrs.get(name) == other.get(name) for name in fields)


def feature_key(identity: dict) -> str:
    """Content key of a feature array: hash of everything that changes its values."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def plan_extraction(manifest: Manifest, settings: ExtractSettings) -> ExtractPlan:
    """Resolve names, sizes and weights and derive one content key per layer."""
    spec = get_spec(settings.backbone)
    weights = resolve_weights(spec, settings.weights, settings.seed)
    size = settings.image_size or spec.default_size
    layers = tuple(dict.fromkeys(settings.layers or (spec.default_layer,)))
    identities = {
        layer: {
            "manifest_key": manifest.key,
            "backbone": spec.name,
            "weights": weights.identity,
            "layer": layer,
            "image_size": size,
            "pooling": settings.pooling,
            "dtype": settings.dtype,
            "preprocess": spec.preprocess,
            "resize": RESIZE_METHOD,
            "version": EXTRACT_VERSION,
        }
        for layer in layers
    }
    return ExtractPlan(spec, weights, size, layers, identities)


def _decode_batch(paths: Sequence[Path], size: int, preprocess: Callable) -> np.ndarray:
    batch = np.stack([load_rgb(path, size) for path in paths])
    return np.asarray(preprocess(batch), dtype=np.float32)


def _prefetched(
    batches: list[list[Path]], size: int, preprocess: Callable, workers: int
) -> Iterator[np.ndarray]:
    """Decode batches in a thread pool, keeping `workers + 1` batches ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        ahead: deque[Future] = deque()
        for paths in batches:
            ahead.append(pool.submit(_decode_batch, paths, size, preprocess))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _units(arrays: list[FeatureArray], n_rows: int) -> list[tuple[int, int]]:
    """Row ranges aligned to every array's chunks that still have a missing chunk."""
    unit = max(a.chunk_rows for a in arrays)
    missing = [set(a.missing_chunks()) for a in arrays]
    todo = []
    for start in range(0, n_rows, unit):
        stop = min(start + unit, n_rows)
        for array, gaps in zip(arrays, missing, strict=True):
            first, last = start // array.chunk_rows, (stop - 1) // array.chunk_rows
            if any(i in gaps for i in range(first, last + 1)):
                todo.append((start, stop))
                break
    return todo


def extract(
    manifest: Manifest,
    store: FeatureStore,
    settings: ExtractSettings,
    progress: ProgressCallback | None = None,
    on_wait: Callable[[], None] | None = None,
    client=None,
) -> ExtractResult:
    """Compute the missing feature chunks of every requested layer in one backbone pass.

    A concurrent extraction of the same features (another process or a scheduled run) is
    waited for, then reused; `on_wait` is called once if that happens. With a Dask `client`,
    the missing chunks are split between its workers, each owning whole chunks.
    """
    began = time.perf_counter()
    plan = plan_extraction(manifest, settings)
    store.save_manifest(manifest)
    keys = {layer: plan.key(layer) for layer in plan.layers}
    with store.locked(list(keys.values()), on_wait):
        return _extract_locked(manifest, store, settings, plan, keys, progress, began, client)


def _extract_locked(
    manifest: Manifest,
    store: FeatureStore,
    settings: ExtractSettings,
    plan: ExtractPlan,
    keys: dict[str, str],
    progress: ProgressCallback | None,
    began: float,
    client=None,
) -> ExtractResult:
    """The body of `extract`, run while this process holds the features' locks."""
    n_rows = len(manifest.records)
    needed = [
        layer
        for layer in plan.layers
        if (a := store.feature_array(keys[layer])) is None or not a.complete
    ]
    if not needed:
        n_features = {
            layer: store.feature_array(keys[layer]).data.shape[1] for layer in plan.layers
        }
        return ExtractResult(
            keys, n_rows, 0, n_rows, time.perf_counter() - began, n_features=n_features
        )

    model = build_feature_model(plan.spec, plan.weights, plan.image_size, needed, settings.pooling)
    widths = [int(np.prod(output.shape[1:])) for output in model.outputs]
    arrays = [
        store.create_feature_array(
            keys[layer],
            n_rows,
            width,
            settings.dtype,
            {
                **plan.identities[layer],
                "class_names": manifest.class_names,
                "settings": asdict(settings),
            },
            chunk_bytes=int(settings.chunk_mb * (1 << 20)),
        )
        for layer, width in zip(needed, widths, strict=True)
    ]
    units = _units(arrays, n_rows)
    streaming = time.perf_counter()
    if client is None:
        sources = [row_sources(store, manifest, plan, layer) for layer in needed]
        computed = _run_units(manifest, model, plan, settings, arrays, units, sources, progress)
    else:
        del model  # each worker builds its own
        computed = _run_on_cluster(client, manifest, store, settings, needed, keys, units, progress)
    rate = computed / (time.perf_counter() - streaming) if computed else None  # excludes build
    seconds = time.perf_counter() - began
    for array in arrays:
        store.update_attrs(array.key, {"extract_seconds": seconds, "images_per_second": rate})
    n_features = {layer: store.feature_array(keys[layer]).data.shape[1] for layer in plan.layers}
    return ExtractResult(keys, n_rows, computed, n_rows - computed, seconds, rate, n_features)


RowSource = dict[int, tuple[FeatureArray, int]]  # row -> (complete array, its row)


def row_sources(
    store: FeatureStore, manifest: Manifest, plan: ExtractPlan, layer: str
) -> RowSource:
    """Rows of this manifest whose features already exist in a complete array with the same
    settings but another manifest (a dataset that grew, or shares images with another).

    Identical settings and identical file bytes give identical features, so those rows are
    copied instead of recomputed: a scheduled run over a grown dataset computes only new images.
    """
    wanted = {record.sha256: row for row, record in enumerate(manifest.records)}
    sources: RowSource = {}
    for array in store.feature_arrays():
        attrs = array.attrs
        if (
            attrs.get("manifest_key") == manifest.key
            or not array.complete
            or not same_settings(attrs, plan.identities[layer])
        ):
            continue
        for their_row, record in enumerate(store.load_manifest(attrs["manifest_key"]).records):
            row = wanted.get(record.sha256)
            if row is not None and row not in sources:
                sources[row] = (array, their_row)
    return sources


class _ChunkCache:
    """Reads rows of other arrays one stored chunk at a time (rows come mostly in order)."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self.block: np.ndarray | None = None

    def row(self, array: FeatureArray, row: int) -> np.ndarray:
        index = row // array.chunk_rows
        if self.key != (array.key, index):
            self.key, self.block = (array.key, index), array.data[array.chunk_slice(index)]
        return self.block[row - index * array.chunk_rows]


def _plan_units(
    arrays: list[FeatureArray],
    missing: list[set[int]],
    sources: list[RowSource],
    units: list[tuple[int, int]],
) -> list[tuple[int, int, list[int]]]:
    """Per unit: the rows that must go through the backbone (missing chunk, no copy source)."""
    work = []
    for start, stop in units:
        need: set[int] = set()
        for array, gaps, source in zip(arrays, missing, sources, strict=True):
            for index in range(start // array.chunk_rows, (stop - 1) // array.chunk_rows + 1):
                if index in gaps:
                    rows = array.chunk_slice(index)
                    need.update(r for r in range(rows.start, rows.stop) if r not in source)
        work.append((start, stop, sorted(need)))
    return work


def _run_units(
    manifest: Manifest,
    model,
    plan: ExtractPlan,
    settings: ExtractSettings,
    arrays: list[FeatureArray],
    units: list[tuple[int, int]],
    sources: list[RowSource],
    progress: ProgressCallback | None,
) -> int:
    """Per unit: decode ahead and infer the rows nobody has, copy the rows another array has,
    write every missing chunk asynchronously. Returns the number of images computed."""
    missing = [set(a.missing_chunks()) for a in arrays]  # read the done flags once
    work = _plan_units(arrays, missing, sources, units)
    size = settings.batch_size
    batches = [rows[i : i + size] for _, _, rows in work for i in range(0, len(rows), size)]
    decoded = _prefetched(
        [manifest.paths(rows) for rows in batches],
        plan.image_size,
        load_preprocess(plan.spec),
        settings.decode_workers,
    )
    total, computed, cache = sum(len(rows) for _, _, rows in work), 0, _ChunkCache()
    writes: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as writer:
        for start, stop, rows in work:
            buffers = [np.zeros((stop - start, a.data.shape[1]), np.float32) for a in arrays]
            for buffer, source in zip(buffers, sources, strict=True):
                for row in range(start, stop):
                    if row in source:
                        buffer[row - start] = cache.row(*source[row])
            for offset in range(0, len(rows), size):
                batch_rows = np.asarray(rows[offset : offset + size]) - start
                outputs = model.predict_on_batch(next(decoded))
                outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
                for buffer, output in zip(buffers, outputs, strict=True):
                    buffer[batch_rows] = np.asarray(output)
                computed += len(batch_rows)
                if progress:
                    progress(computed, total)
            for array, gaps, buffer in zip(arrays, missing, buffers, strict=True):
                for index in range(start // array.chunk_rows, (stop - 1) // array.chunk_rows + 1):
                    if index in gaps:
                        rows_in = array.chunk_slice(index)
                        values = buffer[rows_in.start - start : rows_in.stop - start]
                        writes.append(writer.submit(array.write_chunk, index, values))
            while len(writes) > 2:
                writes.popleft().result()
        while writes:
            writes.popleft().result()
    return computed


def _worker_extract(
    manifest: Manifest,
    location: str,
    settings: ExtractSettings,
    layers: list[str],
    keys: dict[str, str],
    units: list[tuple[int, int]],
    threads: int,
) -> int:
    """Runs inside a Dask worker: build the backbone once and fill the given units' chunks."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already initialised in this worker: keep its thread pools
    store = FeatureStore(location)
    plan = plan_extraction(manifest, settings)
    model = build_feature_model(plan.spec, plan.weights, plan.image_size, layers, settings.pooling)
    arrays = [store.feature_array(keys[layer]) for layer in layers]
    sources = [row_sources(store, manifest, plan, layer) for layer in layers]
    return _run_units(manifest, model, plan, settings, arrays, units, sources, None)


def _run_on_cluster(
    client,
    manifest: Manifest,
    store: FeatureStore,
    settings: ExtractSettings,
    layers: list[str],
    keys: dict[str, str],
    units: list[tuple[int, int]],
    progress: ProgressCallback | None,
) -> int:
    """Give each Dask worker an interleaved share of whole units (so whole chunks): no two
    workers ever write the same chunk, and the result equals a single-process run."""
    from distributed import as_completed

    workers = list(client.scheduler_info()["workers"])
    threads = max(1, (os.cpu_count() or 1) // max(len(workers), 1))
    shares = [units[i :: len(workers)] for i in range(len(workers))]
    futures = [
        client.submit(
            _worker_extract,
            manifest,
            store.location,
            settings,
            layers,
            keys,
            share,
            threads,
            workers=[worker],
            pure=False,
        )
        for worker, share in zip(workers, shares, strict=True)
        if share
    ]
    total, computed = sum(b - a for a, b in units), 0
    for future in as_completed(futures):
        computed += future.result()
        if progress:
            progress(computed, total)
    return computed
