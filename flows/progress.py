"""Progress for long stages (extraction in images, the reduce stage in rows): a rich bar on a
terminal, a log line every half minute otherwise (nohup, CI, a worker's log, the Prefect run
log), and a Prefect progress artifact.

All are throttled so that reporting never slows the backbone down.
"""

from __future__ import annotations

import logging
import sys
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger("featurepipe.extract")


class ProgressDisplay:
    """Callable progress sink: `progress(done, total)` in `unit`s, with an optional `status`
    (the reduce stage's "pass i of m") shown after the description; lines go to `log`."""

    def __init__(
        self,
        description: str,
        min_interval: float = 2.0,
        log_interval: float = 30.0,
        unit: str = "images",
        log: logging.Logger = logger,
    ) -> None:
        self.description = description
        self.unit, self.log = unit, log
        self.min_interval = min_interval
        self.log_interval = log_interval
        self.began = time.perf_counter()
        self.last_artifact = 0.0
        self.last_log = self.began
        self.artifact_id = None
        self.bar: Progress | None = None
        self.task_id = None

    def __enter__(self) -> ProgressDisplay:
        if TaskRunContext.get() is not None:
            self.artifact_id = create_progress_artifact(0.0, description=self.description)
        console = Console(file=sys.stderr)
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.bar.start()
        self.task_id = self.bar.add_task(self.description, total=None, rate="")
        return self

    def __call__(self, done: int, total: int, status: str = "") -> None:
        now = time.perf_counter()
        rate = done / max(now - self.began, 1e-9)
        title = f"{self.description}: {status}" if status else self.description
        if self.bar is not None and not self.bar.disable:
            self.bar.update(
                self.task_id,
                completed=done,
                total=total,
                description=title,
                rate=f"{rate:.1f} {self.unit}/s",
            )
        elif now - self.last_log >= self.log_interval or done == total:
            left = (total - done) / rate if rate else 0.0
            self.log.info(
                "%s: %d/%d %s, %.1f %s/s, about %.0f min left",
                title,
                done,
                total,
                self.unit,
                rate,
                self.unit,
                left / 60,
            )
            self.last_log = now
        if self.artifact_id and (now - self.last_artifact >= self.min_interval or done == total):
            update_progress_artifact(
                self.artifact_id,
                100.0 * done / max(total, 1),
                description=f"{title}: {rate:.1f} {self.unit}/s",
            )
            self.last_artifact = now

    def __exit__(self, error_type: type[BaseException] | None, *exc_info) -> None:
        """A stage that ended without error is complete, also where its planned total was an
        estimate that the work came in under (the reduce stage plans its passes ahead)."""
        if self.bar is not None:
            self.bar.stop()
        if self.artifact_id and error_type is None:
            update_progress_artifact(
                self.artifact_id, 100.0, description=f"{self.description}: done"
            )
