"""kill -9 during extraction, reduction and classification, 20 times: every resume ends with
the uninterrupted run's results (features within float32 rounding, see tests/floats.py).

The loop itself lives in benchmarks/kill_loop.py (shared with benchmarks/kill_resume.py); each
attempt is a real process on a real Zarr store, killed with a real SIGKILL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kill_loop import run_kill_loop

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml


def test_twenty_kills_and_resumes_end_as_an_uninterrupted_run(tmp_path: Path) -> None:
    result = run_kill_loop(tmp_path, rounds=20, seed=0)

    assert [r.index + 1 for r in result.rounds if not r.same] == [], result.summary()
    # Not vacuous: live processes were killed, in every stage. Kill moments are anchored to
    # the stage they fall in, so this holds on a loaded machine too; only moments in the
    # reference run's last instants may find a run already finished.
    assert result.n_killed >= 15, result.summary()
    assert {"extract", "reduce", "classify"} <= result.stages_killed, result.summary()
