"""The feature store: content-keyed Zarr arrays with per-chunk completion flags.

Layout (one Zarr v3 group):
    manifests/<manifest_key>   attrs: the manifest (files, hashes, labels)
    features/<feature_key>/x   (n_images, n_features), chunks of whole images, zstd
    features/<feature_key>/done  one bool per chunk of x, written only after that chunk
    reduced/<reduce_key>/...   projected rows + the fitted scaler/PCA state
A chunk counts as present only when its done flag is set, so a write interrupted at any moment
(kill -9 included) is redone on resume. Only this module knows the layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync

from tasks.data.scan import Manifest
from tasks.errors import UserError

TARGET_CHUNK_BYTES = 16 << 20  # chunks of whole images, a few MB to ~16 MB each
MAX_CHUNK_ROWS = 256  # caps work lost to a crash for narrow (pooled) features
DTYPES = ("float32", "float16")
DEFAULT_STORE = "featurepipe-store"  # where commands and flows look when no store is given
METADATA_LOCK = "store-metadata"  # serialises creation of shared groups between processes
OPEN_MODES = ("a", "r+", "r")  # create if missing / must exist / must exist, read-only


class StoreError(UserError):
    """A missing key or an unusable store; the message says what to do."""


def rows_per_chunk(row_bytes: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Largest power of two of rows that keeps a chunk under TARGET_CHUNK_BYTES.

    Powers of two make the chunk sizes of different layers divide each other, so one forward
    pass can fill chunks of every layer at once.
    """
    rows = 1
    while rows * 2 * row_bytes <= target_bytes and rows * 2 <= MAX_CHUNK_ROWS:
        rows *= 2
    return rows


def _compressor() -> zarr.codecs.ZstdCodec:
    return zarr.codecs.ZstdCodec(level=3)


PROBLEM_KINDS = {
    "not_done": "missing (not marked done)",
    "no_data": "missing data (marked done, object absent)",
    "unreadable": "unreadable",
    "not_finite": "contains NaN or infinity",
}


@dataclass(frozen=True)
class ChunkProblem:
    """One bad chunk found by `FeatureArray.verify`: which chunk, what kind of problem."""

    chunk: int
    kind: str  # a key of PROBLEM_KINDS
    detail: str = ""  # the read error, for "unreadable"

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"chunk {self.chunk}: {PROBLEM_KINDS[self.kind]}{detail}"


@dataclass
class FeatureArray:
    """One feature matrix in the store and its chunk-completion flags."""

    key: str
    group: zarr.Group

    @property
    def data(self) -> zarr.Array:
        # write_empty_chunks is not stored with the array: without it an all-zero chunk (the
        # fill value) would never be written and `verify` would call it missing.
        return self.group["x"].with_config({"write_empty_chunks": True})

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    @property
    def chunk_rows(self) -> int:
        return self.data.chunks[0]

    @property
    def n_chunks(self) -> int:
        return -(-self.data.shape[0] // self.chunk_rows)

    def chunk_slice(self, index: int) -> slice:
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.data.shape[0]))

    def done_flags(self) -> np.ndarray:
        """Completion flag per chunk; a flag that cannot be read counts as not done."""
        done = self.group["done"]
        try:
            return np.asarray(done[:], dtype=bool)
        except Exception:  # one damaged flag must not hide the others
            flags = np.zeros(done.shape[0], dtype=bool)
            for i in range(done.shape[0]):
                try:
                    flags[i] = bool(done[i])
                except Exception:
                    flags[i] = False
            return flags

    def chunk_done(self, index: int) -> bool:
        """One chunk's flag (one small read; a distributed task checks only its own chunks)."""
        try:
            return bool(self.group["done"][index])
        except Exception:  # an unreadable flag counts as not done, as in done_flags
            return False

    def missing_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_flags())]

    @property
    def complete(self) -> bool:
        return not self.missing_chunks()

    def write_chunk(self, index: int, values: np.ndarray) -> None:
        """Write one whole chunk, then mark it done (the order is what makes resume safe)."""
        rows = self.chunk_slice(index)
        if values.shape != (rows.stop - rows.start, self.data.shape[1]):
            raise StoreError(f"chunk {index} of {self.key}: wrong shape {values.shape}")
        self.data[rows] = values.astype(self.data.dtype, copy=False)
        self.group["done"][index] = True

    def unmark_chunk(self, index: int) -> None:
        """Forget a chunk so the next extraction recomputes it (used by verify --repair)."""
        self.group["done"][index] = False

    def as_dask(self):
        """Lazy (n_images, n_features) dask array with one block per stored chunk."""
        import dask.array as da

        return da.from_zarr(self.data)

    def _chunk_object_exists(self, index: int) -> bool:
        """Whether chunk `index` is stored (reading a missing chunk silently gives zeros)."""
        key = self.data.metadata.encode_chunk_key((index, 0))
        return bool(sync((self.data.store_path / key).exists()))

    def verify(self) -> list[ChunkProblem]:
        """Read every chunk back; return one problem per missing or unreadable chunk."""
        problems = []
        flags = self.done_flags()
        for index in range(self.n_chunks):
            if not flags[index]:
                problems.append(ChunkProblem(index, "not_done"))
                continue
            if not self._chunk_object_exists(index):
                problems.append(ChunkProblem(index, "no_data"))
                continue
            try:
                block = self.data[self.chunk_slice(index)]
            except Exception as error:
                detail = f"{type(error).__name__}: {error}"
                problems.append(ChunkProblem(index, "unreadable", detail))
                continue
            if not np.isfinite(block).all():
                problems.append(ChunkProblem(index, "not_finite"))
        return problems

    def repair(self, problems: list[ChunkProblem]) -> None:
        """Forget the chunks `verify` found bad, so the next extraction recomputes them."""
        for problem in problems:
            self.unmark_chunk(problem.chunk)

    def summary(self) -> dict[str, Any]:
        """Shape, size and completeness for `store ls`."""
        missing = len(self.missing_chunks())
        data = self.data
        return {
            "key": self.key,
            "kind": "features",
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "chunks_done": self.n_chunks - missing,
            "chunks_total": self.n_chunks,
            "complete": missing == 0,
            "stored_bytes": int(data.nbytes_stored()),
            **{
                k: self.attrs.get(k)
                for k in (
                    "backbone",
                    "weights",
                    "layer",
                    "image_size",
                    "pooling",
                    "manifest_key",
                    "created",
                )
            },
        }


class FeatureStore:
    """A Zarr group holding manifests, feature arrays and reductions, addressed by content key."""

    def __init__(self, location: str, mode: str = "a") -> None:
        """Mode "a" creates the store if needed (extraction); "r+" (maintenance) and "r"
        (inspection, read-only) need it to exist, so a mistyped --store leaves nothing behind."""
        if mode not in OPEN_MODES:
            raise ValueError(f"mode must be one of {OPEN_MODES}, got {mode!r}")
        self.location = str(location)
        try:
            with self.locked([METADATA_LOCK]) if mode == "a" else contextlib.nullcontext():
                self.root = zarr.open_group(self.location, mode=mode, zarr_format=3)
        except FileNotFoundError:  # zarr's GroupNotFoundError is one too
            raise StoreError(f"no feature store at {self.location}") from None
        except OSError as error:
            raise StoreError(f"cannot open feature store {self.location}: {error}") from error

    def _subgroup(self, name: str) -> zarr.Group:
        """Create shared groups under a lock: concurrent first writes of zarr.json would race."""
        with self.locked([METADATA_LOCK]):
            return self.root.require_group(name)

    # manifests
    def save_manifest(self, manifest: Manifest) -> str:
        with self.locked([METADATA_LOCK]):
            group = self.root.require_group("manifests").require_group(manifest.key)
            if not group.attrs.get("manifest"):
                group.attrs.put({"manifest": manifest.to_dict(), "created": time.time()})
        return manifest.key

    def load_manifest(self, key: str) -> Manifest:
        try:
            return Manifest.from_dict(self.root[f"manifests/{key}"].attrs["manifest"])
        except KeyError:
            raise StoreError(f"no manifest {key} in {self.location}") from None

    def manifest_for(self, feature_key: str) -> Manifest:
        """The manifest whose images a feature array holds (row order included)."""
        array = self.feature_array(feature_key)
        if array is None:
            raise StoreError(f"no features {feature_key} in {self.location}")
        return self.load_manifest(array.attrs["manifest_key"])

    # features
    def feature_array(self, key: str) -> FeatureArray | None:
        try:
            group = self.root[f"features/{key}"]
        except KeyError:
            return None
        if "x" not in group or "done" not in group:
            return None
        return FeatureArray(key, group)

    def create_feature_array(
        self,
        key: str,
        n_rows: int,
        n_features: int,
        dtype: str,
        attrs: dict[str, Any],
        chunk_bytes: int = TARGET_CHUNK_BYTES,
    ) -> FeatureArray:
        """Preallocate the array (no data written) or return the existing one for this key."""
        existing = self.feature_array(key)
        if existing is not None:
            return existing
        if dtype not in DTYPES:
            raise StoreError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        group = self._subgroup("features").require_group(key)
        chunk_rows = rows_per_chunk(n_features * np.dtype(dtype).itemsize, chunk_bytes)
        group.create_array(
            "x",
            shape=(n_rows, n_features),
            chunks=(chunk_rows, n_features),
            dtype=dtype,
            compressors=_compressor(),
            fill_value=0,
            config={"write_empty_chunks": True},
            overwrite=True,
        )
        n_chunks = -(-n_rows // chunk_rows)
        group.create_array(
            "done",
            shape=(n_chunks,),
            chunks=(1,),
            dtype="bool",
            fill_value=False,
            config={"write_empty_chunks": True},
            overwrite=True,
        )
        group.attrs.put({**attrs, "key": key, "created": time.time()})
        return FeatureArray(key, group)

    def update_attrs(self, key: str, values: dict[str, Any]) -> None:
        self.root[f"features/{key}"].attrs.update(values)

    def feature_arrays(self) -> Iterator[FeatureArray]:
        if "features" not in self.root:
            return
        for key in sorted(self.root["features"].group_keys()):
            array = self.feature_array(key)
            if array is not None:
                yield array

    # reductions
    def save_reduction(
        self,
        key: str,
        arrays: dict[str, Any],
        attrs: dict[str, Any],
        chunks: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        """Store projected rows and fitted state (in `chunks` by name, Zarr's default chunks
        otherwise); `complete` is set last so a crash is visible."""
        with self.locked([key]):  # `gc` must not delete it half-written
            group = self._subgroup("reduced").require_group(key)
            group.attrs.put({**attrs, "key": key, "complete": False})
            for name, values in arrays.items():
                values = np.asarray(values)
                group.create_array(
                    name,
                    data=values,
                    chunks=(chunks or {}).get(name, "auto"),
                    compressors=_compressor(),
                    overwrite=True,
                    config={"write_empty_chunks": True},
                )
            group.attrs.update({"complete": True, "created": time.time()})

    def reduction_attrs(self, key: str) -> dict[str, Any] | None:
        """Attributes of a complete reduction (no array is read), or None."""
        try:
            attrs = self.root[f"reduced/{key}"].attrs.asdict()
        except KeyError:
            return None
        return attrs if attrs.get("complete") else None

    def load_reduction(
        self, key: str, names: Callable[[str], bool] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Arrays (those whose name `names` accepts, default all) and attributes of a complete
        reduction. Callers pick: the (k, d) PCA components can be far larger than the rows."""
        attrs = self.reduction_attrs(key)
        if attrs is None:
            return None
        group = self.root[f"reduced/{key}"]
        return {
            name: array[...] for name, array in group.arrays() if names is None or names(name)
        }, attrs

    def summaries(self) -> list[dict[str, Any]]:
        """One row per feature array and per reduction, for `store ls`."""
        rows = [array.summary() for array in self.feature_arrays()]
        rows += [
            {
                "key": key,
                "kind": "reduced",
                **{
                    name: attrs.get(name)
                    for name in ("feature_key", "n_components", "method", "complete")
                },
            }
            for key, attrs in self.reductions()
        ]
        return rows

    def reductions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if "reduced" not in self.root:
            return
        for key in sorted(self.root["reduced"].group_keys()):
            yield key, self.root[f"reduced/{key}"].attrs.asdict()

    @contextlib.contextmanager
    def locked(
        self, keys: list[str], on_wait: Callable[[], None] | None = None, wait: bool = True
    ) -> Iterator[bool]:
        """Hold an exclusive lock per key while computing or writing it (local stores only).

        A second process extracting the same features waits here, then finds them complete:
        no corruption and no duplicated work. The kernel drops flock locks when a process
        dies (kill -9 included), so a crash never leaves a stale lock behind. With
        wait=False a busy key is not waited for: the context yields False instead of True.
        """
        if "://" in self.location:  # object stores have no flock; one writer per chunk holds
            yield True
            return
        folder = Path(self.location).expanduser() / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for key in sorted(keys):  # a fixed order: two processes can never deadlock
                handle = stack.enter_context(open(folder / f"{key}.lock", "a+b"))
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if on_wait:
                        on_wait()
                    fcntl.flock(handle, fcntl.LOCK_EX)
            yield True

    # maintenance
    def find(self, prefix: str) -> tuple[str, str]:
        """Resolve a (possibly shortened) key to ('features'|'reduced'|'manifests', full key)."""
        matches = [
            (kind, key)
            for kind in ("features", "reduced", "manifests")
            if kind in self.root
            for key in self.root[kind].group_keys()
            if key.startswith(prefix)
        ]
        if not matches:
            raise StoreError(f"no key starting with {prefix!r} in {self.location}")
        if len(matches) > 1:
            raise StoreError(f"key prefix {prefix!r} is ambiguous: {[m[1] for m in matches]}")
        return matches[0]

    def describe(self, prefix: str) -> dict[str, Any]:
        """Kind and every attribute of one entry (features: with their summary), without the
        bulky manifest and row lists."""
        kind, key = self.find(prefix)
        attrs = self.root[f"{kind}/{key}"].attrs.asdict()
        if kind == "features":
            attrs = {**self.feature_array(key).summary(), **attrs}
        attrs.pop("manifest", None)
        attrs.pop("train_rows", None)
        return {"kind": kind, **attrs}

    def remove(self, prefix: str) -> str:
        kind, key = self.find(prefix)
        del self.root[kind][key]
        return f"{kind}/{key}"

    def gc(self) -> list[str]:
        """Remove reductions whose features are gone or that a crash left incomplete, and
        manifests no array refers to. A reduction another process is writing is left alone."""
        removed = []
        feature_keys = {a.key for a in self.feature_arrays()}
        for key, attrs in list(self.reductions()):
            if attrs.get("feature_key") in feature_keys and attrs.get("complete"):
                continue
            with self.locked([key], wait=False) as free:
                if free:
                    del self.root["reduced"][key]
                    removed.append(f"reduced/{key}")
        used = {a.attrs.get("manifest_key") for a in self.feature_arrays()}
        if "manifests" in self.root:
            for key in list(self.root["manifests"].group_keys()):
                if key not in used:
                    del self.root["manifests"][key]
                    removed.append(f"manifests/{key}")
        return removed
