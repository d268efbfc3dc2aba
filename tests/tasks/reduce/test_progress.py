"""The reduce stage's progress: "pass i of m", rows done and time left, through the same sink
as extraction (flows/progress.py) into the `featurepipe.reduce` log, here and as task graphs."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import dask.array as da
import pytest
from threadpoolctl import threadpool_limits

from flows.progress import ProgressDisplay
from tasks.reduce import _stream
from tasks.reduce._passes import use
from tasks.reduce._progress import reporting
from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA
from tasks.reduce.plan import Shape, planned_passes
from tests.tasks.reduce.test_pca import _features, _zarr

ROWS, COLS = 400, 300


@pytest.fixture(scope="module", autouse=True)
def _small_steps() -> Iterator[None]:
    """Steps of 2 chunks (64 rows): each pass reports several times."""
    with pytest.MonkeyPatch.context() as patch, threadpool_limits(1):
        patch.setattr(_stream, "STEP_BYTES", 64 * COLS * 4)
        yield


@pytest.fixture(scope="module")
def X(tmp_path_factory: pytest.TempPathFactory) -> da.Array:
    raw, _ = _features(ROWS, COLS, seed=5)
    return _zarr(tmp_path_factory.mktemp("progress") / "x.zarr", raw)


def _reported(X: da.Array, est, method: str, backend: str) -> list[tuple[int, int, str]]:
    calls: list[tuple[int, int, str]] = []
    passes = planned_passes(method, Shape(ROWS, COLS, ROWS), 10, True, None)
    with use(backend), reporting(lambda *call: calls.append(call), ROWS, passes, ROWS):
        est.fit(X)
        est.project(X)
    return calls


@pytest.mark.parametrize("backend", ["here", "workers"])
@pytest.mark.parametrize(
    ("method", "make", "phases"),
    [
        ("randomized", lambda: ScaledPCA(method="randomized", n_components=10), 7),
        ("incremental", lambda: ScaledIncrementalPCA(n_components=10, batch_size=64), 3),
    ],
)
def test_every_pass_reports_rows_and_pass_i_of_m(
    X: da.Array, backend: str, method: str, make, phases: int
) -> None:
    calls = _reported(X, make(), method, backend)
    done = [c[0] for c in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] == phases * ROWS
    statuses = [c[2] for c in calls]
    assert statuses[0] == f"pass 1 of {phases} (column statistics)"
    assert statuses[-1] == f"pass {phases} of {phases} (projection)"
    numbers = [tuple(map(int, re.match(r"pass (\d+) of (\d+)", s).groups())) for s in statuses]
    assert [i for i, _ in numbers] == sorted(i for i, _ in numbers)
    assert {m for _, m in numbers} == {phases}  # the plan's count was right: m never moved
    if backend == "here":  # block by block within a pass
        assert len(calls) > 2 * phases


def test_a_fit_that_grows_raises_m(X: da.Array) -> None:
    """Planned for one sketch, a variance target that needs a wider one adds passes."""
    calls = _reported(X, ScaledPCA(method="randomized", variance=0.99), "randomized", "here")
    last_fit = [c[2] for c in calls if "projection" not in c[2]][-1]
    i, m = map(int, re.match(r"pass (\d+) of (\d+)", last_fit).groups())
    assert i == m - 1 and m > 7 and calls[-1][0] == calls[-1][1]


def test_the_log_line_says_pass_rows_and_time_left(
    X: da.Array, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("featurepipe.reduce")
    passes = planned_passes("randomized", Shape(ROWS, COLS, ROWS), 10, True, None)
    with (
        caplog.at_level(logging.INFO, logger="featurepipe.reduce"),
        ProgressDisplay("reduce block5_pool", log_interval=0.0, unit="rows", log=log) as sink,
        reporting(sink, ROWS, passes, ROWS),
    ):
        ScaledPCA(method="randomized", n_components=10).fit(X)
    lines = [r.getMessage() for r in caplog.records if r.name == "featurepipe.reduce"]
    pattern = r"reduce block5_pool: pass (\d) of 7 \(([a-zA-Z ]+)\): (\d+)/2800 rows, [\d.]+ rows/s"
    matches = [re.match(pattern + r", about \d+ min left$", line) for line in lines]
    assert all(matches), lines
    assert {m[2] for m in matches} == {"column statistics", "power iteration", "Ritz pass"}
    assert int(matches[-1][3]) == 6 * ROWS
