"""Stream a manifest through a backbone into the feature store, chunk by chunk, resumably.

Decoding runs in a thread pool ahead of inference and chunk writes run in a writer thread, so
the backbone rarely waits. Only chunks whose done flag is missing are computed, which makes a
second run free and a killed run resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.backbones.precision import CHOICES as PRECISION_CHOICES
from tasks.backbones.precision import resolve_precision
from tasks.backbones.registry import (
    BackboneSpec,
    WeightsChoice,
    build_feature_model,
    get_spec,
    load_preprocess,
    resolve_weights,
)
from tasks.backbones.settings import BackboneSettings
from tasks.data.images import RESIZE_METHOD, load_rgb
from tasks.data.scan import Manifest
from tasks.features.store import DTYPES, FeatureArray, FeatureStore

EXTRACT_VERSION = "2"  # bump when a code change alters the features for the same settings
ProgressCallback = Callable[[int, int], None]


POOLINGS = ("avg", "max")


class ExtractSettings(BackboneSettings):
    """Everything that decides which features are computed (plus how fast)."""

    layers: tuple[str, ...] = Field((), description="Cut layers; empty = the backbone's default")
    pooling: Literal[POOLINGS] | None = Field(None, description="Global pooling of each cut")
    dtype: Literal[DTYPES] = Field("float32", description="Stored feature type")
    precision: Literal[PRECISION_CHOICES] = Field(
        "auto",
        description="Backbone compute precision (mixed 16-bit keeps float32 weights); "
        "auto: bfloat16 or float16 where the hardware runs it natively and the backbone gains "
        "from it, else float32",
    )
    decode_workers: int = Field(2, ge=1, description="Threads decoding images ahead")
    chunk_mb: float = Field(16.0, gt=0, description="Storage layout only: not in the feature key")


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
        "precision",
        "preprocess",
        "resize",
        "version",
    )
    return all(attrs.get(name) == other.get(name) for name in fields)


def feature_key(identity: dict) -> str:
    """Content key of a feature array: hash of everything that changes its values."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def resolve_backbone(settings: ExtractSettings) -> tuple[BackboneSpec, WeightsChoice, int]:
    """Backbone, weights and input size the settings name: resolved wherever a model is built
    (client or worker), so a weights file is read from each machine's own disk."""
    spec = get_spec(settings.backbone)
    weights = resolve_weights(spec, settings.weights, settings.seed)
    return spec, weights, settings.image_size or spec.default_size


def build_model(
    spec: BackboneSpec,
    weights: WeightsChoice,
    image_size: int,
    layers: Sequence[str],
    settings: ExtractSettings,
):
    """The feature model of the settings, cut at `layers`: the one place that builds it, for
    the local run and for every Dask worker alike."""
    return build_feature_model(
        spec, weights, image_size, list(layers), settings.pooling, settings.precision
    )


def output_widths(model) -> list[int]:
    """Features per image of each model output (one output per cut layer)."""
    return [int(np.prod(output.shape[1:])) for output in model.outputs]


def plan_extraction(manifest: Manifest, settings: ExtractSettings) -> ExtractPlan:
    """Resolve names, sizes and weights and derive one content key per layer."""
    spec, weights, size = resolve_backbone(settings)
    layers = tuple(dict.fromkeys(settings.layers or (spec.default_layer,)))
    precision = resolve_precision(settings.precision, spec.depthwise)
    # in the key only when not float32, so keys made before the setting existed stay valid
    mixed = {} if precision == "float32" else {"precision": precision}
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
            **mixed,
        }
        for layer in layers
    }
    return ExtractPlan(spec, weights, size, layers, identities)


def _decode_batch(paths: Sequence[str | Path], size: int, preprocess: Callable) -> np.ndarray:
    batch = np.stack([load_rgb(path, size) for path in paths])
    return np.asarray(preprocess(batch), dtype=np.float32)


def prefetched(
    batches: Sequence[Sequence[str | Path]], size: int, preprocess: Callable, workers: int
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


def with_resolved_precision(settings: ExtractSettings) -> ExtractSettings:
    """The settings with `auto` precision decided: workers build with the precision the keys
    name, and a backbone built ahead (warm-up) is the one the units find in their cache."""
    depthwise = get_spec(settings.backbone).depthwise
    return settings.model_copy(
        update={"precision": resolve_precision(settings.precision, depthwise)}
    )


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
    settings = with_resolved_precision(settings)
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

    if client is None:
        model = build_model(plan.spec, plan.weights, plan.image_size, needed, settings)
        widths = output_widths(model)
    else:  # a worker builds the backbone (and keeps it for its units): no TensorFlow here
        from tasks.features.on_cluster import cluster_widths

        widths = cluster_widths(client, settings, plan.weights.identity, needed)
    arrays = [
        store.create_feature_array(
            keys[layer],
            n_rows,
            width,
            settings.dtype,
            {
                **plan.identities[layer],
                "class_names": manifest.class_names,
                "settings": settings.model_dump(mode="json"),
            },
            chunk_bytes=int(settings.chunk_mb * (1 << 20)),
        )
        for layer, width in zip(needed, widths, strict=True)
    ]
    units = plan_units(manifest, store, plan, arrays, needed)
    streaming = time.perf_counter()
    if client is None:
        predict = model.predict_on_batch
        computed = _run_units(predict, plan, settings, store, arrays, units, progress)
    else:
        from tasks.features.on_cluster import run_on_cluster

        identity = plan.weights.identity
        computed = run_on_cluster(client, store, settings, identity, needed, keys, units, progress)
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


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) covering whole chunks of every array: the smallest piece of work one
    process finishes alone. No two units share a chunk, so units run anywhere, in any order,
    twice if need be (a rerun writes the same bytes)."""

    start: int
    stop: int
    rows: tuple[int, ...]  # rows that go through the backbone
    paths: tuple[str, ...]  # their image files (paths or fsspec URLs): read where the unit runs
    copies: tuple[tuple[tuple[int, str, int], ...], ...]  # per array: (row, source key, its row)
    chunks: tuple[tuple[int, ...], ...]  # per array: the missing chunks this unit writes


def plan_units(
    manifest: Manifest,
    store: FeatureStore,
    plan: ExtractPlan,
    arrays: list[FeatureArray],
    layers: Sequence[str],
) -> list[Unit]:
    """One unit per span of the widest chunk that still has a missing chunk in some array;
    rows another complete array already holds are copied, not recomputed."""
    n_rows = len(manifest.records)
    span = max(a.chunk_rows for a in arrays)
    missing = [set(a.missing_chunks()) for a in arrays]  # read the done flags once
    sources = [row_sources(store, manifest, plan, layer) for layer in layers]
    units = []
    for start in range(0, n_rows, span):
        stop = min(start + span, n_rows)
        chunks, copies, need = [], [], set()
        for array, gaps, source in zip(arrays, missing, sources, strict=True):
            first, last = start // array.chunk_rows, (stop - 1) // array.chunk_rows
            todo = tuple(i for i in range(first, last + 1) if i in gaps)
            rows = [r for i in todo for r in range(*array.chunk_slice(i).indices(n_rows))]
            chunks.append(todo)
            copies.append(tuple((r, source[r][0].key, source[r][1]) for r in rows if r in source))
            need.update(r for r in rows if r not in source)
        if any(chunks):
            rows = sorted(need)
            paths = tuple(str(path) for path in manifest.paths(rows))
            units.append(Unit(start, stop, tuple(rows), paths, tuple(copies), tuple(chunks)))
    return units


def unit_batches(unit: Unit, batch_size: int) -> list[tuple[str, ...]]:
    """The unit's image files in backbone batches (the same batches wherever it runs)."""
    return [unit.paths[i : i + batch_size] for i in range(0, len(unit.paths), batch_size)]


class ChunkCache:
    """Reads rows of other arrays one stored chunk at a time (rows come mostly in order)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.arrays: dict[str, FeatureArray] = {}
        self.key: tuple[str, int] | None = None
        self.block: np.ndarray | None = None

    def row(self, key: str, row: int) -> np.ndarray:
        if key not in self.arrays:
            self.arrays[key] = self.store.feature_array(key)
        array = self.arrays[key]
        index = row // array.chunk_rows
        if self.key != (key, index):
            self.key, self.block = (key, index), array.data[array.chunk_slice(index)]
        return self.block[row - index * array.chunk_rows]


def compute_unit(
    unit: Unit,
    arrays: list[FeatureArray],
    predict: Callable[[np.ndarray], object],
    decoded: Iterator[np.ndarray],
    copier: ChunkCache,
    batch_size: int,
    on_rows: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """One buffer per array over the unit's rows: copies filled in, the other rows inferred
    from `decoded` (the unit's batches, in `unit_batches` order)."""
    buffers = [np.zeros((unit.stop - unit.start, a.data.shape[1]), np.float32) for a in arrays]
    for buffer, copies in zip(buffers, unit.copies, strict=True):
        for row, key, their_row in copies:
            buffer[row - unit.start] = copier.row(key, their_row)
    for offset in range(0, len(unit.rows), batch_size):
        batch_rows = np.asarray(unit.rows[offset : offset + batch_size]) - unit.start
        outputs = predict(next(decoded))
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for buffer, output in zip(buffers, outputs, strict=True):
            buffer[batch_rows] = np.asarray(output)
        if on_rows:
            on_rows(len(batch_rows))
    return buffers


def unit_writes(
    unit: Unit, arrays: list[FeatureArray], buffers: list[np.ndarray]
) -> Iterator[tuple[FeatureArray, int, np.ndarray]]:
    """(array, chunk index, values) for every chunk the unit fills."""
    for array, chunks, buffer in zip(arrays, unit.chunks, buffers, strict=True):
        for index in chunks:
            rows = array.chunk_slice(index)
            yield array, index, buffer[rows.start - unit.start : rows.stop - unit.start]


def _run_units(
    predict: Callable[[np.ndarray], object],
    plan: ExtractPlan,
    settings: ExtractSettings,
    store: FeatureStore,
    arrays: list[FeatureArray],
    units: list[Unit],
    progress: ProgressCallback | None,
) -> int:
    """In this process: decode ahead across units, infer, write every chunk asynchronously.
    Returns the number of images computed."""
    size = settings.batch_size
    decoded = prefetched(
        [batch for unit in units for batch in unit_batches(unit, size)],
        plan.image_size,
        load_preprocess(plan.spec),
        settings.decode_workers,
    )
    total, computed = sum(len(unit.rows) for unit in units), 0

    def count(rows: int) -> None:
        nonlocal computed
        computed += rows
        if progress:
            progress(computed, total)

    copier = ChunkCache(store)
    writes: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as writer:
        for unit in units:
            buffers = compute_unit(unit, arrays, predict, decoded, copier, size, count)
            for array, index, values in unit_writes(unit, arrays, buffers):
                writes.append(writer.submit(array.write_chunk, index, values))
            while len(writes) > 2:
                writes.popleft().result()
        while writes:
            writes.popleft().result()
    return computed
