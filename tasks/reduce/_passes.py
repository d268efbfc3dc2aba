"""Where a PCA pass runs. Each algorithm writes a pass once, as functions of one row block,
and the backend active for the fit decides where those functions run:

* `Here` (no distributed client): the active scheduler (Dask's threads) reads, decompresses
  and scales the blocks, and this process applies the functions to each block as it arrives
  (`_stream.stream`), accumulating in place: no copy of any partial result.
* `OnWorkers` (a distributed client is active, or forced by `use`): the functions run as
  tasks next to the block reads, and only small results come back: a fold's partial results
  are merged by a tree of tasks (`SPLIT_EVERY` at a time) on the workers and this process
  receives one merged result; a map returns each step's small rows. No raw block is sent to
  this process. Operands made here (a basis, components, weights) are scattered to every
  worker (scattered data cannot be recomputed, so each worker keeps a copy and losing one
  loses none); every other task is in a graph that Dask recomputes when a worker is lost.
  Tasks are not pinned: the scheduler balances them and moves a lost worker's share.

Every pass logs one line with the bytes this process received and the bytes of the rows it
covered (`_stream.log_phase`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from uuid import uuid4

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from dask.sizeof import sizeof
from threadpoolctl import threadpool_limits

from tasks.reduce._progress import advance
from tasks.reduce._stats import ColumnStats, RunningStats, column_stats
from tasks.reduce._stream import log_phase, stream, timed

SPLIT_EVERY = 2  # partial results merged per task: a merge holds 3 (k, d) or (d, d) arrays
CHAIN_WINDOW = 4  # chain steps per submitted window (two windows in flight): bounds read-ahead

Add = Callable[..., Any]
"""A fold's step: (accumulator or None, block, start, stop, *shared) -> accumulator; it may
update the accumulator in place and creates it when given None."""


def add_arrays(*parts: Any) -> Any:
    """Sum of partial results (arrays, floats, or tuples of them), inputs left untouched."""
    if isinstance(parts[0], tuple):
        return tuple(add_arrays(*same) for same in zip(*parts, strict=True))
    total = parts[0] + parts[1]
    for part in parts[2:]:
        total += part
    return total


def _data_bytes(X: da.Array, steps: list[tuple[int, int]]) -> int:
    """Bytes of the scaled float32 rows a pass covers: the yardstick for what it returns."""
    return sum(b - a for a, b in steps) * X.shape[1] * 4


class Here:
    """Passes computed in this process from blocks the active scheduler reads."""

    def share(self, value: Any) -> Any:
        return value

    def call(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) here: the arguments are arrays in this process."""
        with timed(phase):
            return fn(*args)

    def statistics(
        self, X: da.Array, steps: list[tuple[int, int]], keep: int
    ) -> tuple[ColumnStats, np.ndarray]:
        """Column statistics of the raw rows, keeping rows [0, keep) as read: that panel is
        not read twice."""
        panel = np.empty((keep, X.shape[1]), np.float32)
        stats = RunningStats(X.shape[1])
        for a, b, block in stream(X, steps, "statistics + first panel read"):
            stats.add(block)
            if b <= keep:
                panel[a:b] = block
        return stats.result(), panel

    def rows(self, Xc: da.Array, steps: list[tuple[int, int]], phase: str) -> np.ndarray:
        """The rows of contiguous `steps`, in this process."""
        start = steps[0][0]
        out = np.empty((steps[-1][1] - start, Xc.shape[1]), np.float32)
        for a, b, block in stream(Xc, steps, phase):
            out[a - start : b - start] = block
        return out

    def fold(
        self,
        Xc: da.Array,
        steps: list[tuple[int, int]],
        add: Add,
        phase: str,
        *shared: Any,
        start: Any = None,
    ) -> Any:
        acc = start
        for a, b, block in stream(Xc, steps, phase):
            acc = add(acc, block, a, b, *shared)
        return acc

    def map(
        self,
        Xc: da.Array,
        steps: list[tuple[int, int]],
        fn: Callable[..., Any],
        phase: str,
        *shared,
    ) -> Iterator[tuple[int, int, Any]]:
        for a, b, block in stream(Xc, steps, phase):
            yield a, b, fn(block, a, b, *shared)

    def chain(
        self,
        Xs: da.Array,
        steps: list[tuple[int, int]],
        batch: int,
        step: Callable[[Any, np.ndarray], Any],
        state: Any,
        copy: Callable[[Any], Any],
        phase: str,
    ) -> Any:
        """state = step(state, rows) for consecutive batches of `batch` rows (the last may be
        shorter), updating `state` in place (`copy` is for backends that must not)."""
        pieces: list[np.ndarray] = []
        held = 0
        for _a, _b, block in stream(Xs, steps, phase):
            start = 0
            while start < len(block):
                take = min(batch - held, len(block) - start)
                pieces.append(block[start : start + take])
                held, start = held + take, start + take
                if held == batch:
                    state = step(state, _joined(pieces))
                    pieces, held = [], 0
        return step(state, _joined(pieces)) if held else state


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class OnWorkers:
    """Passes as Dask graphs: block read -> function -> merges, where the data is.

    With a distributed client the graphs run on its workers; without one (for measuring)
    on Dask's threads, one BLAS thread per task.
    """

    def __init__(self, client: Any | None) -> None:
        self.client = client

    # ------------------------------------------------------------------ plumbing
    def share(self, value: Any) -> Any:
        if self.client is None:
            return value
        return self.client.scatter(value, broadcast=True, hash=False)

    def _compute(self, graphs: list[Delayed]) -> list[Any]:
        if self.client is None:
            with threadpool_limits(1, user_api="blas"):
                return list(dask.compute(*graphs, scheduler="threads"))
        return self.client.gather(self.client.compute(graphs))

    def call(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) as one task (args may be futures: the task runs where they are)."""
        with self._logged(phase, None, []) as received:
            (result,) = self._compute([_task(fn)(*args)])
            received.append(sizeof(result))
        return result

    @staticmethod
    def _blocks(X: da.Array, steps: list[tuple[int, int]]) -> list[Delayed]:
        """One lazy block per step (contiguous row ranges: the rows are rechunked to them)."""
        if any(b0 != a1 for (_, b0), (a1, _) in zip(steps, steps[1:], strict=False)):
            raise ValueError("steps must be contiguous")
        part = X[steps[0][0] : steps[-1][1]].rechunk({0: tuple(b - a for a, b in steps)})
        return list(part.to_delayed().ravel())

    @contextmanager
    def _logged(
        self, phase: str, X: da.Array | None, steps: list[tuple[int, int]]
    ) -> Iterator[list]:
        """Log the pass with the bytes this process received (the caller appends each
        result's size to the yielded list) against the bytes of its rows."""
        began, cpu = time.perf_counter(), time.process_time()
        received: list[Any] = []
        yield received
        log_phase(
            phase,
            time.perf_counter() - began,
            time.process_time() - cpu,
            rows=sum(b - a for a, b in steps),
            client_bytes=sum(received),
            data_bytes=0 if X is None else _data_bytes(X, steps),
        )

    # ------------------------------------------------------------------ passes
    def statistics(
        self, X: da.Array, steps: list[tuple[int, int]], keep: int
    ) -> tuple[ColumnStats, None]:
        """Column statistics by Dask's tree reductions on the workers (no panel kept here)."""
        return column_stats(X, with_m2=False), None

    def rows(self, Xc: da.Array, steps: list[tuple[int, int]], phase: str) -> Any:
        """The rows of contiguous `steps` as one array held on a worker (a future: it stays
        there, and Dask recomputes it from the graph if that worker is lost)."""
        joined = _task(_concatenate)(self._blocks(Xc, steps))
        rows = steps[-1][1] - steps[0][0]
        if self.client is None:
            result = joined.compute(scheduler="threads")
            advance(rows, phase)
            return result
        from distributed import wait

        with self._logged(phase, Xc, steps):
            future = self.client.compute(joined)
            wait(future)
        advance(rows, phase)
        return future

    def fold(
        self,
        Xc: da.Array,
        steps: list[tuple[int, int]],
        add: Add,
        phase: str,
        *shared: Any,
        start: Any = None,
    ) -> Any:
        if not steps:
            return start
        leaves = [
            _task(add)(None, block, a, b, *shared)
            for block, (a, b) in zip(self._blocks(Xc, steps), steps, strict=True)
        ]
        with self._logged(phase, Xc, steps) as received:
            if self.client is None:
                (result,) = self._compute([_tree(leaves, _task(add_arrays))])
                advance(steps[-1][1] - steps[0][0], phase)
            else:
                result = self._fold_on_cluster(leaves, steps, phase)
            received.append(sizeof(result))
        return result if start is None else add_arrays(start, result)

    def _fold_on_cluster(
        self, leaves: list[Delayed], steps: list[tuple[int, int]], phase: str
    ) -> Any:
        """The leaves as futures merged by a tree of submitted tasks, counting rows as each
        leaf finishes (a leaf's data goes once its merge has it: no future is kept here)."""
        from distributed import as_completed

        futures = self.client.compute(leaves)
        rows = {f.key: b - a for f, (a, b) in zip(futures, steps, strict=True)}
        root = _tree(futures, self._merge)
        finished = as_completed(futures)
        del futures
        for future in finished:
            advance(rows[future.key], phase)
            del future
        return root.result()

    def _merge(self, *parts: Any) -> Any:
        return self.client.submit(add_arrays, *parts, key=f"pca-addarrays-{uuid4().hex}")

    def map(
        self,
        Xc: da.Array,
        steps: list[tuple[int, int]],
        fn: Callable[..., Any],
        phase: str,
        *shared,
    ) -> Iterator[tuple[int, int, Any]]:
        if not steps:
            return
        graphs = [
            _task(fn)(block, a, b, *shared)
            for block, (a, b) in zip(self._blocks(Xc, steps), steps, strict=True)
        ]
        with self._logged(phase, Xc, steps) as received:
            if self.client is None:
                results = iter(self._compute(graphs))
            else:
                futures = self.client.compute(graphs)
                results = (futures[i].result() for i in range(len(futures)))
            for (a, b), result in zip(steps, results, strict=True):
                received.append(sizeof(result))
                yield a, b, result
                advance(b - a, phase)
        del graphs

    def chain(
        self,
        Xs: da.Array,
        steps: list[tuple[int, int]],
        batch: int,
        step: Callable[[Any, np.ndarray], Any],
        state: Any,
        copy: Callable[[Any], Any],
        phase: str,
    ) -> Any:
        """The sequential chain as tasks: each step takes the previous state (a future on a
        worker, copied there rather than changed: Dask may need it again) and one batch.

        Windows of CHAIN_WINDOW steps are submitted with two in flight, so the workers read
        ahead at most two windows of batches (reads are ready long before the chain reaches
        them, and would otherwise pile up in memory)."""
        start, stop = steps[0][0], steps[-1][1]
        bounds = list(range(start, stop, batch)) + [stop]
        batches = list(zip(bounds[:-1], bounds[1:], strict=True))
        blocks = self._blocks(Xs, batches)
        from distributed import wait

        with self._logged(phase, Xs, steps) as received:
            node: Any = self.share(state)
            in_flight: list[Any] = []
            windows = [batches[i : i + CHAIN_WINDOW] for i in range(0, len(batches), CHAIN_WINDOW)]
            window_rows = [w[-1][1] - w[0][0] for w in windows]
            for i, window in enumerate(windows):
                for block in blocks[i * CHAIN_WINDOW : i * CHAIN_WINDOW + len(window)]:
                    node = _task(_chain_step)(step, copy, node, block)
                if self.client is None:
                    (node,) = self._compute([node])
                    advance(window_rows[i], phase)
                    continue
                node = self.client.compute(node)
                in_flight.append(node)
                if len(in_flight) > 1:
                    wait(in_flight.pop(0))  # there, not here; the newer window keeps running
                    advance(window_rows[i - 1], phase)
            result = node if self.client is None else node.result()
            if self.client is not None:
                advance(window_rows[-1], phase)
            received.append(sizeof(result))
        return result


def _task(fn: Callable[..., Any]) -> Callable[..., Delayed]:
    """fn as a lazy task keyed "pca-<name>-<unique>": the passes' tasks, told apart on the
    dashboard and by the scheduler (a test kills the worker running one)."""
    name = f"pca-{fn.__name__.strip('_').replace('_', '')}"
    return lambda *args: delayed(fn, pure=False)(*args, dask_key_name=f"{name}-{uuid4().hex}")


def _tree(parts: list[Any], merge: Callable[..., Any]) -> Any:
    """parts merged SPLIT_EVERY at a time, level by level, into one."""
    while len(parts) > 1:
        groups = [parts[i : i + SPLIT_EVERY] for i in range(0, len(parts), SPLIT_EVERY)]
        parts = [merge(*g) if len(g) > 1 else g[0] for g in groups]
    return parts[0]


def _concatenate(blocks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _chain_step(
    step: Callable[[Any, np.ndarray], Any], copy: Callable[[Any], Any], state: Any, block: Any
) -> Any:
    return step(copy(state), np.asarray(block, np.float32))


Passes = Here | OnWorkers
_forced: ContextVar[str | None] = ContextVar("passes", default=None)


def _distributed_client() -> Any | None:
    """The distributed client Dask computes with, if one is active."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover (distributed is a dependency)
        return None
    try:
        return default_client()
    except ValueError:
        return None


def active() -> Passes:
    """The backend for this fit: on the workers when a distributed client is active."""
    forced, client = _forced.get(), _distributed_client()
    if forced == "here" or (forced is None and client is None):
        return Here()
    return OnWorkers(client)


@contextmanager
def use(kind: str) -> Iterator[None]:
    """Force "here" or "workers" (for benchmarks and tests that compare the two)."""
    if kind not in ("here", "workers"):
        raise ValueError(f"unknown backend {kind!r}")
    token = _forced.set(kind)
    try:
        yield
    finally:
        _forced.reset(token)
