"""Progress of the reduce stage: "pass i of m", rows done and time left, reported to a sink
(flows/progress.py draws a bar on a terminal and logs the line elsewhere).

The passes report the rows they finish (`advance`): block by block where results come back
one at a time (a stream here, a map, a fold's leaves on a cluster), at the end of the pass
where they do not. A pass is n training rows streamed (gram's panel passes each cover part of
the rows), then one projection pass over every row. m is the memory plan's estimate of the
fit's passes (tasks/reduce/plan.py's `planned_passes`) plus the projection; a fit that grows
its sketch or batch beyond the estimate raises m.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Sink = Callable[[int, int, str], None]
"""(rows done, rows of every planned pass, "pass i of m (phase)") -> None"""

PROJECTION = "projection"


class StageProgress:
    """Rows streamed so far, against the rows of the planned passes."""

    def __init__(self, sink: Sink, rows: int, passes: int, projected: int) -> None:
        self.sink, self.rows, self.projected = sink, max(rows, 1), projected
        self.fit_total = passes * self.rows
        self.fit_done = self.projected_done = 0

    def advance(self, rows: int, phase: str) -> None:
        if phase == PROJECTION:
            self.projected_done += rows
        else:
            self.fit_done += rows
            self.fit_total = max(self.fit_total, math.ceil(self.fit_done / self.rows) * self.rows)
        fit_passes = self.fit_total // self.rows
        m = fit_passes + (1 if self.projected else 0)  # the projection's pass, when planned
        i = m if phase == PROJECTION else min(max(1, -(-self.fit_done // self.rows)), fit_passes)
        self.sink(
            self.fit_done + self.projected_done,
            self.fit_total + self.projected,
            f"pass {i} of {m} ({phase})",
        )


_active: ContextVar[StageProgress | None] = ContextVar("reduce_progress", default=None)


@contextmanager
def reporting(sink: Sink | None, rows: int, passes: int, projected: int) -> Iterator[None]:
    """Report the passes run inside the block to `sink` (None: report nothing): `passes`
    planned over `rows` training rows, then one over `projected` rows."""
    token = _active.set(None if sink is None else StageProgress(sink, rows, passes, projected))
    try:
        yield
    finally:
        _active.reset(token)


def advance(rows: int, phase: str) -> None:
    """`rows` more rows of `phase` are done (nothing when no stage is reporting)."""
    progress = _active.get()
    if progress is not None:
        progress.advance(rows, phase)
