"""kill -9 at random moments during extraction, reduction and classification, then resume.

Each round runs the pipeline on a fresh store, SIGKILLs it at a seeded random moment, runs it
again to completion and compares the store and results with an uninterrupted reference run.

Kill moments are uniform over the reference run's work, stratified (one per 1/rounds of it), and
each is re-anchored to the start of the stage it falls in: "0.3 s into reduce" rather than
"1.6 s after start". On a loaded machine the rounds run slower than the reference, and plain
delays from the start then missed classification altogether; anchored ones keep hitting all
three stages.

Attempts are separate OS processes started from a multiprocessing "forkserver" that has already
imported TensorFlow, Keras, scikit-learn and the project's modules: a fresh interpreter spends
seconds importing them per attempt, a fork from the server a few milliseconds, and the kill is
still a real SIGKILL of a real process. The server is a fresh interpreter (never the caller)
that has only imported TensorFlow and run nothing; each forked child then starts TensorFlow's
runtime on its own (checked: children run ops and build models normally).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.runs.schema import RunReport
from tests.floats import features_close

STAGES = ("extract", "reduce", "classify", "done")
CLASSIFIERS = ["logreg", "svm"]
# Everything the pipeline imports that is slow to import, loaded once by the fork server.
PRELOAD = [
    "tensorflow",
    "keras",
    "sklearn",
    "dask.array",
    "tasks.data.scan",
    "tasks.features.extract",
    "tasks.data.splits",
    "tasks.reduce.stage",
    "tasks.features.store",
    "tasks.reduce.pca",
    "tasks.classify.models",
    "tasks.runs.plots",
    "tasks.runs.folder",
    "tasks.runs.report",
    "benchmarks.kill_loop",
]


def pipeline(data: str, store_path: str, run_dir: str, stage_log: str) -> None:
    """The pipeline under test: scan, extract (several chunks), split, reduce, classify.

    Each stage it enters is appended to `stage_log` as one small write(2) on an O_APPEND file,
    so a SIGKILL leaves whole lines behind, never half a record (a Queue's pipe could be cut).
    """
    from tasks.classify.stage import classify_run
    from tasks.data.scan import scan
    from tasks.data.splits import split_rows
    from tasks.features.extract import ExtractSettings, extract
    from tasks.features.store import FeatureStore
    from tasks.reduce.stage import reduce_cached

    def reached(stage: str) -> None:
        fd = os.open(stage_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{stage} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)

    reached("extract")
    manifest = scan(data)
    store = FeatureStore(store_path)
    settings = ExtractSettings(
        backbone="vgg16",
        weights="none",
        layers=("block2_pool",),
        image_size=32,
        batch_size=4,
        chunk_mb=0.1,
    )
    key = extract(manifest, store, settings).feature_keys["block2_pool"]
    train, test = split_rows(manifest, "stratified", 0.25, 0)
    reached("reduce")
    reduction = reduce_cached(store, key, train)
    reached("classify")
    classify_run(
        store,
        manifest,
        reduction,
        train,
        test,
        CLASSIFIERS,
        Path(run_dir),
        {"layer": "block2_pool"},
    )
    reached("done")


def _in_child(output_log: str, *args: str) -> None:
    """Process entry point: the attempt's stdout/stderr (TensorFlow's start-up chatter, a
    traceback) go to its own log instead of interleaving with the caller's report lines."""
    fd = os.open(output_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    pipeline(*args)


@dataclass
class Round:
    """One kill-and-resume round: where the kill landed and what was wrong afterwards."""

    index: int
    target: str  # the stage the kill moment was anchored to ("start": the process start)
    offset: float  # seconds after entering `target`
    seconds: float  # seconds after the process start when it was killed (or finished)
    stage: str  # the last stage the killed attempt had entered ("start" if none)
    killed: bool  # False when the attempt had already finished before the moment came
    resume_seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.problems

    def line(self) -> str:
        outcome = "same" if self.same else "DIFFERENT: " + "; ".join(self.problems)
        moment = f"{self.target}+{self.offset:.2f} s"
        landed = f"killed during {self.stage}" if self.killed else "had already finished"
        return (
            f"round {self.index + 1:2d}: kill at {moment:17s} ({self.seconds:4.2f} s in): "
            f"{landed:23s} resumed in {self.resume_seconds:3.1f} s -> {outcome}"
        )


@dataclass
class KillLoopResult:
    """The reference run's timing and every round's record."""

    reference_seconds: float
    rounds: list[Round]

    @property
    def n_same(self) -> int:
        return sum(r.same for r in self.rounds)

    @property
    def n_killed(self) -> int:
        return sum(r.killed for r in self.rounds)

    @property
    def stages_killed(self) -> set[str]:
        """Stages in which a live process was killed (not counting ones that had finished)."""
        return {r.stage for r in self.rounds if r.killed}

    def summary(self) -> str:
        stages = ", ".join(s for s in STAGES if s in self.stages_killed) or "no stage"
        return (
            f"{self.n_same}/{len(self.rounds)} resumed runs the same as the "
            f"uninterrupted one ({self.n_killed} killed mid-run, in {stages})"
        )


@dataclass
class _Attempt:
    """One pipeline process: its exit code, wall time and the stages it logged."""

    exitcode: int
    seconds: float
    stages: list[tuple[str, float]]  # (stage, seconds from start when it was entered)
    last_output: str  # the last line it printed: the error, when it failed

    @property
    def stage(self) -> str:
        return self.stages[-1][0] if self.stages else "start"


def _logged_stages(stage_log: Path, started: float) -> list[tuple[str, float]]:
    lines = stage_log.read_text().splitlines() if stage_log.exists() else []
    return [(name, float(stamp) - started) for name, stamp in (line.split() for line in lines)]


def _attempt(
    context: multiprocessing.context.ForkServerContext,
    data: Path,
    store: Path,
    run_dir: Path,
    kill_at: tuple[str, float] | None = None,
) -> _Attempt:
    """Run the pipeline in a forked process; SIGKILL it `kill_at` = (stage, seconds) into
    that stage if it is still alive then.

    Its stage log and output log lie next to its run folder: <run>.stages and <run>.log."""
    stage_log = run_dir.with_name(run_dir.name + ".stages")
    output_log = run_dir.with_name(run_dir.name + ".log")
    process = context.Process(
        target=_in_child,
        args=(str(output_log), str(data), str(store), str(run_dir), str(stage_log)),
    )
    began, started = time.perf_counter(), time.time()
    process.start()
    if kill_at is not None:
        stage, offset = kill_at
        while (
            stage != "start"
            and process.is_alive()
            and stage not in dict(_logged_stages(stage_log, started))
        ):
            time.sleep(0.005)
        process.join(offset)
        process.kill()  # a no-op if it has already exited
    process.join()
    seconds = time.perf_counter() - began
    stages = _logged_stages(stage_log, started)
    output = output_log.read_text().strip().splitlines() if output_log.exists() else []
    return _Attempt(process.exitcode, seconds, stages, output[-1] if output else "")


def _store_state(store: Path, report: RunReport) -> tuple[np.ndarray, np.ndarray]:
    """The features and projected rows a finished run's report points at."""
    from tasks.features.store import FeatureStore
    from tasks.reduce.stage import load_projected

    feature_store = FeatureStore(str(store))
    features = feature_store.feature_array(report.keys["features"])
    if features is None or not features.complete:
        raise ValueError(f"features {report.keys['features']} missing or incomplete")
    return features.data[...], load_projected(feature_store, report.keys["reduction"])[0]


def _run_problems(run_dir: Path, reference: RunReport) -> list[str]:
    """What is wrong with a finished run folder: accuracies, or a model that fails its hash."""
    from tasks.runs.folder import ModelIntegrityError, load_model, read_report

    report = read_report(run_dir)
    problems = []
    if report.accuracy() != reference.accuracy():
        problems.append(f"{run_dir.name}: accuracy {report.accuracy()}")
    for name in report.classifiers:
        try:
            load_model(run_dir, name)
        except (ModelIntegrityError, OSError, EOFError) as error:
            problems.append(f"{run_dir.name}: model {name} does not load ({error})")
    return problems


def _killed_run_problems(runs: Path, killed_dir: Path, reference: RunReport) -> list[str]:
    """A killed run folder is listed, and its models load, only once its report.json is whole.

    list_runs parses every report.json under `runs`, so a half-written one fails here too."""
    from tasks.runs.folder import list_runs, load_model

    listed = killed_dir.name in {row["id"] for row in list_runs(runs)}
    if listed != (killed_dir / "report.json").exists():
        return [f"{killed_dir.name}: listed={listed} but report.json exists={not listed}"]
    if listed:
        return _run_problems(killed_dir, reference)
    problems = []
    for name in CLASSIFIERS:
        try:
            load_model(killed_dir, name)
        except OSError:
            continue  # refused: there is no report to vouch for the file
        problems.append(f"{killed_dir.name}: model {name} loads without a report")
    return problems


def _write_images(folder: Path) -> None:
    """64 tiny images in two separable classes: enough for several feature chunks."""
    from tests.conftest import write_image  # lazy: the fork server need not import pytest

    for i in range(64):
        write_image(folder / ("a" if i % 2 else "b") / f"{i}.png", seed=i, tint=120 * (i % 2))


def _kill_moments(rng: random.Random, rounds: int, reference: _Attempt) -> list[tuple[str, float]]:
    """One uniform moment in each of `rounds` equal slices of the reference run, in shuffled
    order, as (stage it falls in, seconds after that stage began)."""
    starts = [("start", 0.0), *reference.stages]
    slices = list(range(rounds))
    rng.shuffle(slices)
    moments = []
    for slice_ in slices:
        moment = (slice_ + rng.random()) * reference.seconds / rounds
        stage, began = [start for start in starts if start[1] <= moment][-1]
        moments.append((stage, moment - began))
    return moments


def run_kill_loop(
    work: Path, rounds: int, seed: int, report: Callable[[str], None] = print
) -> KillLoopResult:
    """Reference run, then `rounds` kill-and-resume rounds, each on its own store under `work`."""
    from tasks.runs.folder import read_report

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # no effect if this process's server already runs
    began = time.perf_counter()
    warm_up = context.Process(target=time.sleep, args=(0,))  # waits for the server's imports,
    warm_up.start()  # which must not count as pipeline time
    warm_up.join()
    server_seconds = time.perf_counter() - began
    data, runs = work / "images", work / "runs"
    _write_images(data)
    runs.mkdir(parents=True)
    ref = _attempt(context, data, work / "reference", runs / "reference")
    if ref.exitcode != 0:
        raise RuntimeError(f"reference run failed in {ref.stage}: {ref.last_output}")
    reference = read_report(runs / "reference")
    ref_features, ref_projected = _store_state(work / "reference", reference)
    offsets = {name: round(seconds, 2) for name, seconds in ref.stages}
    report(
        f"fork server ready in {server_seconds:.1f} s; reference run: {ref.seconds:.1f} s, "
        f"stages entered at {offsets} s, accuracy {reference.accuracy()}"
    )

    records = []
    for index, (target, offset) in enumerate(_kill_moments(random.Random(seed), rounds, ref)):
        store, killed_dir = work / f"store-{index}", runs / f"round-{index}"
        killed = _attempt(context, data, store, killed_dir, (target, offset))
        resumed_dir = runs / f"round-{index}-resumed"
        resumed = _attempt(context, data, store, resumed_dir)
        record = Round(
            index,
            target,
            offset,
            killed.seconds,
            killed.stage,
            killed.exitcode == -signal.SIGKILL,
            resumed.seconds,
        )
        if killed.exitcode not in (0, -signal.SIGKILL):
            record.problems.append(f"killed attempt crashed: {killed.last_output}")
        if resumed.exitcode != 0:
            record.problems.append(f"resumed run failed: {resumed.last_output}")
        else:
            features, projected = _store_state(store, read_report(resumed_dir))
            if not features_close(features, ref_features):
                record.problems.append("features differ beyond float32 rounding")
            if not np.allclose(projected, ref_projected, atol=1e-5):
                record.problems.append("projected rows differ")
            record.problems += _run_problems(resumed_dir, reference)
        record.problems += _killed_run_problems(runs, killed_dir, reference)
        records.append(record)
        report(record.line())
    result = KillLoopResult(ref.seconds, records)
    report(result.summary())
    return result
