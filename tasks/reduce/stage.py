"""The reduce stage: scaling + PCA fitted on a feature array's training rows, cached by content key.

It never touches images or builds a backbone; the classify stage reads what it stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.data.splits import rows_key
from tasks.errors import UserError
from tasks.features.store import FeatureStore, StoreError
from tasks.reduce._progress import Sink, reporting
from tasks.reduce.plan import Plan, Shape, Workers, check, memory_limit, plan, workers_from

REDUCE_VERSION = "2"  # bump when a code change alters reductions for the same settings
# Bytes of one chunk of projected rows: the streamed classifier's row slice at its default
# buffer (buffer_mib 32 / MIX_SLICES 8, tasks/classify/streamed.py), so a pass decompresses
# each chunk once (a slice smaller than its chunk decompresses the chunk once per slice).
PROJECTED_CHUNK_BYTES = 4 * 2**20


@dataclass
class ReduceOutcome:
    """Where the reduced rows are and how they were made."""

    key: str
    feature_key: str
    n_components: int
    method: str
    cached: bool
    seconds: float
    explained_variance: float


PCA_METHODS = ("auto", "gram", "randomized", "incremental")
logger = logging.getLogger("featurepipe.reduce")


class PcaSettings(BaseModel):
    """How to reduce: the PCA method and where to cut, a variance target or a fixed count.

    `method` reads `pca_method` in flags, config files and reports (beside other stages' keys).
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    method: Literal[PCA_METHODS] = Field(
        "auto",
        alias="pca_method",
        description="auto (the fastest estimate whose memory fits, from the rows, features, "
        "workers and memory limits), gram (exact), randomized or incremental",
    )
    variance: float = Field(0.8, gt=0.0, le=1.0, description="PCA variance target")
    components: int | None = Field(
        None, ge=1, description="Fixed number of PCA components (instead of the variance target)"
    )
    memory_limit: float | None = Field(
        None,
        gt=0,
        description="GiB the reduce stage may plan for (default: 80% of RAM or the cgroup limit)",
    )

    @property
    def target(self) -> float | None:
        """The variance target the cut aims at; None when the count is fixed."""
        return self.variance if self.components is None else None

    def identity(self) -> dict:
        """The part of a reduction's key these settings decide (as before `components`
        existed when it is unset, so earlier reductions stay valid)."""
        cut = (
            {"variance": self.variance}
            if self.components is None
            else {"components": self.components}
        )
        return {"method": self.method, **cut}


DEFAULT_PCA = PcaSettings()


def reduce_key(feature_key: str, train_rows: np.ndarray, pca: PcaSettings) -> str:
    """Content key of a reduction: features + train rows + scaling/PCA settings."""
    identity = {
        "feature_key": feature_key,
        "train_rows": rows_key(train_rows),
        "scaling": "minmax",
        **pca.identity(),
        "version": REDUCE_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def planned(
    store: FeatureStore, feature_key: str, train_rows: np.ndarray, pca: PcaSettings
) -> tuple[PcaSettings, Plan, Shape] | None:
    """The settings with the method the memory plan chooses ("auto" resolved), the plan and
    the shapes it was made for; None when the features are not in the store."""
    features = store.feature_array(feature_key)
    if features is None:
        return None
    rows, d = features.data.shape
    shape = Shape(len(train_rows), d, rows)
    limit, source = memory_limit(pca.memory_limit)
    chosen = plan(shape, pca.method, pca.variance, pca.components, limit, source, _workers())
    return pca.model_copy(update={"method": chosen.method}), chosen, shape


def _workers() -> Workers | None:
    """The workers the PCA passes will run on (the active distributed client's), or None
    when they run in this process."""
    from tasks.reduce._passes import active

    client = getattr(active(), "client", None)
    return None if client is None else workers_from(client.scheduler_info(n_workers=-1))


def cached_reduction(
    store: FeatureStore, feature_key: str, train_rows: np.ndarray, pca: PcaSettings = DEFAULT_PCA
) -> ReduceOutcome | None:
    """The stored reduction for these settings, if any (cheap: no Dask cluster needed).

    "auto" looks for the method the memory plan chooses, so a reduction made with the
    method auto picks keeps its key."""
    began = time.perf_counter()
    if pca.method == "auto":
        resolved = planned(store, feature_key, train_rows, pca)
        if resolved is None:
            return None
        pca = resolved[0]
    key = reduce_key(feature_key, train_rows, pca)
    attrs = store.reduction_attrs(key)
    if attrs is None:
        return None
    return ReduceOutcome(
        key,
        feature_key,
        attrs["n_components"],
        attrs["method"],
        True,
        time.perf_counter() - began,
        attrs["explained_variance"],
    )


def _check_components(pca: PcaSettings, n_train: int, n_features: int) -> None:
    """PCA of n centred rows has at most n - 1 components (and no more than features)."""
    limit = min(n_train - 1, n_features)
    if pca.components is not None and pca.components > limit:
        raise UserError(
            f"--components {pca.components} is more than PCA can give here: at most "
            f"{limit} ({n_train} training images - 1, {n_features} features); "
            "ask for fewer, or use --variance"
        )


def reduce_cached(
    store: FeatureStore,
    feature_key: str,
    train_rows: np.ndarray,
    pca: PcaSettings = DEFAULT_PCA,
    progress: Sink | None = None,
) -> ReduceOutcome:
    """Fit min-max + PCA on the train rows only, project every row, and store both.

    Runs on whatever Dask scheduler is active: with a distributed client open, every PCA pass
    runs on its workers and only small results come back (tasks/reduce/_passes.py).
    `progress` gets the rows done, the rows planned and "pass i of m" as the passes stream.
    """
    began = time.perf_counter()
    requested = pca.method
    resolved = planned(store, feature_key, train_rows, pca)
    if resolved is not None:
        pca = resolved[0]
    cached = cached_reduction(store, feature_key, train_rows, pca)
    if cached is not None:
        return cached
    key = reduce_key(feature_key, train_rows, pca)
    features = store.feature_array(feature_key)
    if features is None or not features.complete:
        raise StoreError(f"features {feature_key} are missing or incomplete: run extract first")
    _check_components(pca, len(train_rows), features.data.shape[1])
    _, memory_plan, shape = resolved
    check(memory_plan, shape, pca.variance, pca.components)  # stop before reading anything
    logger.info(memory_plan.describe(shape))
    data = features.as_dask()
    base = (
        _incremental_base(store, feature_key, train_rows, pca)
        if pca.method == "incremental"
        else None
    )
    lineage = {}
    with reporting(progress, shape.n, memory_plan.passes, shape.rows):
        if base is None:
            fitted = _estimator(pca, memory_plan.cap).fit(data[np.sort(train_rows)])
        else:  # a grown dataset: update the earlier fit with the new training rows only
            base_key, new_rows = base
            fitted = load_pca(store, base_key)
            if new_rows:
                fitted.partial_fit(data[np.asarray(new_rows)])
            lineage = {"updated_from": base_key, "rows_added": len(new_rows)}
        projected = fitted.project(data)
    state, state_attrs = fitted.to_state()
    explained = float(np.sum(fitted.explained_variance_ratio_))
    if pca.target is not None and explained < pca.target:
        logger.warning(
            "PCA %s kept %d components explaining %.4f of the variance, short of the %s target",
            fitted.method_,
            fitted.n_components_,
            explained,
            pca.target,
        )
    attrs = {
        "feature_key": feature_key,
        "method": fitted.method_,
        "n_components": int(fitted.n_components_),
        "variance": pca.target,
        "components": pca.components,
        "explained_variance": explained,
        "train_rows": np.sort(train_rows).tolist(),
        "pca": state_attrs,
        "memory_plan": {
            "requested": requested,
            "estimated_peak_bytes": memory_plan.peak,
            "limit_bytes": memory_plan.limit,
            "limit_source": memory_plan.limit_source,
            "expected_components": memory_plan.k,
            "worker_peak_bytes": memory_plan.worker_peak,
            "worker_limit_bytes": getattr(memory_plan.workers, "limit", None),
            "estimated_seconds": memory_plan.seconds,
        },
        "seconds": time.perf_counter() - began,
        **lineage,
    }
    store.save_reduction(
        key,
        {"projected": projected, **{f"pca_{name}": value for name, value in state.items()}},
        attrs,
        chunks={"projected": projected_chunks(*projected.shape)},
    )
    return ReduceOutcome(
        key,
        feature_key,
        int(fitted.n_components_),
        fitted.method_,
        False,
        time.perf_counter() - began,
        explained,
    )


def projected_chunks(rows: int, k: int) -> tuple[int, int]:
    """Chunks of whole rows (every component: a row is read whole, and a column split means
    one more decompression per slice) of about PROJECTED_CHUNK_BYTES float32."""
    return max(1, min(rows, PROJECTED_CHUNK_BYTES // (4 * max(k, 1)))), max(k, 1)


def _estimator(pca: PcaSettings, cap: int | None = None):
    """The unfitted estimator for these settings; `cap` is the memory plan's largest batch or
    sketch for a method that grows toward a variance target."""
    from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA

    if pca.method == "incremental":
        return ScaledIncrementalPCA(
            variance=pca.variance, n_components=pca.components, max_batch=cap
        )
    if pca.method == "randomized":
        return ScaledPCA(
            variance=pca.variance, n_components=pca.components, method="randomized", max_width=cap
        )
    return ScaledPCA(variance=pca.variance, n_components=pca.components, method=pca.method)


def _incremental_base(
    store: FeatureStore, feature_key: str, train_rows: np.ndarray, pca: PcaSettings
) -> tuple[str, list[int]] | None:
    """An incremental reduction of an earlier version of this dataset (same extraction
    settings, another manifest) whose training images are all among ours: its key and the
    training rows it has not seen. The closest one (fewest new rows) wins."""
    from tasks.features.extract import same_settings

    ours = store.manifest_for(feature_key)
    our_settings = store.feature_array(feature_key).attrs
    our_train = Counter(ours.records[r].sha256 for r in train_rows)
    best: tuple[int, str, list[int]] | None = None
    for key, attrs in store.reductions():
        if (
            attrs.get("method") != "incremental"
            or attrs.get("variance") != pca.target
            or attrs.get("components") != pca.components
            or not attrs.get("complete")
            or attrs.get("feature_key") == feature_key
        ):
            continue
        sibling = store.feature_array(attrs["feature_key"])
        if sibling is None or not same_settings(sibling.attrs, our_settings):
            continue
        theirs = store.load_manifest(sibling.attrs["manifest_key"])
        seen = Counter(theirs.records[r].sha256 for r in attrs["train_rows"])
        if seen - our_train:
            continue  # it learned from an image we do not train on: no exact update exists
        new_rows = []
        for row in sorted(int(r) for r in train_rows):
            sha = ours.records[row].sha256
            if seen[sha] > 0:
                seen[sha] -= 1
            else:
                new_rows.append(row)
        if best is None or len(new_rows) < best[0]:
            best = (len(new_rows), key, new_rows)
    return None if best is None else (best[1], best[2])


def load_projected(store: FeatureStore, key: str) -> tuple[np.ndarray, dict]:
    """The projected rows of a stored reduction and its attributes."""
    loaded = store.load_reduction(key, names=lambda name: name == "projected")
    if loaded is None:
        raise StoreError(f"no complete reduction {key} in {store.location}")
    arrays, attrs = loaded
    return arrays["projected"], attrs


def load_pca(store: FeatureStore, key: str):
    """The fitted estimator of a stored reduction (used by prediction): a ScaledPCA, or a
    ScaledIncrementalPCA for method "incremental"."""
    from tasks.reduce.pca import ScaledPCA

    loaded = store.load_reduction(key, names=lambda name: name.startswith("pca_"))
    if loaded is None:
        raise StoreError(f"no complete reduction {key} in {store.location}")
    arrays, attrs = loaded
    state = {name[len("pca_") :]: value for name, value in arrays.items()}
    return ScaledPCA.from_state(state, attrs["pca"])
