"""Flow wiring that is ours, run by Prefect itself (local mode): retries on I/O only."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest
from prefect import flow, task

from flows.pipeline import IO_RETRIES
from tasks.errors import UserError
from tasks.reduce import pca as reduce
from tasks.reduce._progress import reporting

FAST_RETRIES = {**IO_RETRIES, "retry_delay_seconds": [0, 0]}  # same policy, no waiting


def _attempts_until_done(error: Exception, failures: int) -> int:
    """Run a task that fails `failures` times with `error` under the production retry policy."""
    attempts = []

    @task(**FAST_RETRIES)
    def step() -> None:
        attempts.append(1)
        if len(attempts) <= failures:
            raise error

    @flow
    def wrapper() -> None:
        step()

    try:
        wrapper()
    except type(error):
        pass
    return len(attempts)


def test_transient_io_errors_are_retried() -> None:
    assert _attempts_until_done(ConnectionResetError("store hiccup"), failures=2) == 3


def test_bad_input_is_not_retried() -> None:
    assert _attempts_until_done(UserError("no such layer"), failures=5) == 1


def test_io_errors_give_up_after_two_retries() -> None:
    # 10 failures planned: a policy with more retries would make more than 3 attempts.
    assert _attempts_until_done(TimeoutError("object store did not answer"), failures=10) == 3


def test_pca_progress_lines_reach_the_run_log(caplog: pytest.LogCaptureFixture) -> None:
    from flows.progress import ExtractProgress

    rows = da.from_array(np.random.default_rng(0).random((64, 16)), chunks=(8, 16))

    def fit_with_progress() -> None:
        log = logging.getLogger("featurepipe.reduce")
        with (
            ExtractProgress("reduce x", log_interval=0.0, unit="rows", log=log) as progress,
            reporting(progress, 64, 2, 0),
        ):
            reduce.ScaledPCA(variance=0.9).fit(rows)

    @flow
    def fit() -> None:
        task(fit_with_progress)()

    fit()
    assert "reduce x: pass 1 of 2 (column statistics): 64/128 rows" in caplog.text


def test_extraction_progress_is_logged_when_no_terminal_shows_a_bar(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flows.progress import ExtractProgress

    with ExtractProgress("extract vgg16", log_interval=0.0) as progress:  # pytest: no terminal
        progress(16, 64)
    assert "extract vgg16: 16/64 images" in caplog.text and "min left" in caplog.text
