"""Progress inside a fine-tuning epoch: batches done of the epoch's total, images/s and the
time left, as a live line on a terminal and a log line every `log_interval` seconds.

An epoch over all blood cells takes 10+ minutes on a CPU; without this, nothing is printed
until it ends. The logger sits under `featurepipe.`, which the CLI hands to Prefect's run log.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("featurepipe.finetune")

Clock = Callable[[], float]


def epoch_progress(
    images: int,
    batch_size: int,
    describe: Callable[[int], str],
    log_interval: float = 30.0,
    clock: Clock = time.perf_counter,
):
    """A Keras callback reporting the training batches of every epoch.

    `images` are the epoch's training images, `describe(epoch)` names an epoch (0-based, as
    Keras counts) in the lines, `clock` is injectable so tests need no waiting.
    """
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.total = max(1, math.ceil(images / batch_size))
            self.bar = None

        def on_train_begin(self, logs=None) -> None:
            self.bar = _live_line()

        def on_epoch_begin(self, epoch: int, logs=None) -> None:
            self.label = describe(epoch)
            self.began = self.last_log = clock()
            if self.bar is not None:
                self.line = self.bar.add_task(self.label, total=self.total, rate="")

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            done, now = batch + 1, clock()
            elapsed = max(now - self.began, 1e-9)
            rate = min(done * batch_size, images) / elapsed
            left = (self.total - done) * elapsed / done
            if self.bar is not None:
                self.bar.update(self.line, completed=done, rate=f"{rate:.1f} img/s")
            if now - self.last_log >= log_interval or done == self.total:
                logger.info(
                    "%s: batch %d/%d, %.1f images/s, %s left in the epoch",
                    self.label,
                    done,
                    self.total,
                    rate,
                    _duration(left),
                )
                self.last_log = now

        def on_train_end(self, logs=None) -> None:
            if self.bar is not None:
                self.bar.stop()

    return EpochProgress()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _live_line():
    """A started rich progress display on stderr, or None when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        return None
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches {task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
    )
    bar.start()
    return bar
