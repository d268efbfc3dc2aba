"""Prefect flow for fine-tuning: scan -> split -> fine-tune (resumable) -> run folder.

Thin wiring over tasks.finetune (settings, data, model, training): the flow adds the Prefect
logger, a progress artifact per epoch and the run's summary artifacts; `resume` continues an
interrupted run with its own saved settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field, field_validator

from flows.pipeline import publish_run, scan_task
from flows.settings import DataSettings, SettingsError, comma_list, stage_settings
from tasks.data.scan import Manifest
from tasks.data.splits import split_rows
from tasks.finetune.settings import FinetuneSettings
from tasks.finetune.training import EpochLog, read_state, run_finetune
from tasks.runs.folder import is_finished, new_run_id
from tasks.runs.schema import RunReport


class FinetuneFlowSettings(FinetuneSettings, DataSettings):
    """Every knob of a fine-tuning run: the data and split, the fine-tuning, and `resume`."""

    resume: str | None = Field(
        None, description="Run id of an interrupted fine-tuning to continue with its saved settings"
    )

    @field_validator("head", mode="before")
    @classmethod
    def _widths(cls, value: Any) -> Any:
        """Accept "512,64" from flags as well as a list from a config file."""
        return [int(part) for part in comma_list(value)] if isinstance(value, str) else value

    def finetune_settings(self) -> FinetuneSettings:
        return stage_settings(self, FinetuneSettings)

    def run_settings(self) -> dict:
        """What report.json and the checkpoint state record: enough to resume the run."""
        return self.model_dump(mode="json", exclude={"resume"})


def _run_name() -> str:
    settings = flow_run.parameters.get("settings")
    if isinstance(settings, dict):
        settings = FinetuneFlowSettings(**settings)
    data = Path(settings.data).name if settings.data else "resume"
    return f"finetune-{data}-{settings.backbone}"


def resolve_run(settings: FinetuneFlowSettings) -> tuple[FinetuneFlowSettings, Path]:
    """The settings and folder of this run: a new one, or the interrupted run to resume.

    A resume takes the saved settings; any flag given explicitly must agree with them, so
    a changed setting is an error rather than silently ignored.
    """
    if settings.resume is None:
        if settings.data is None:
            raise SettingsError("data is required (or resume with the id of a run)")
        return settings, settings.runs / new_run_id()
    run_dir = settings.runs / settings.resume
    state = read_state(run_dir)
    if is_finished(run_dir) or state is None:
        raise SettingsError(
            f"{run_dir} is not an interrupted fine-tuning run: "
            f"{'it has finished' if state else 'no checkpoint state in it'}"
        )
    saved = {k: v for k, v in state.run_settings.items() if k in type(settings).model_fields}
    merged = FinetuneFlowSettings(**{**saved, "resume": settings.resume, "runs": settings.runs})
    given = settings.model_fields_set - {"resume", "runs"}
    changed = sorted(k for k in given if getattr(settings, k) != getattr(merged, k))
    if changed:
        raise SettingsError(f"cannot resume {settings.resume} with different {', '.join(changed)}")
    return merged, run_dir


class _EpochProgress:
    """Per epoch: one Prefect log line and an update of the task's progress artifact."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(0.0, description="fine-tuning epochs")

    def __call__(self, entry: EpochLog) -> None:
        scores = ", ".join(f"{key} {value:.4f}" for key, value in entry.metrics.items())
        self.logger.info(
            "phase %d epoch %d/%d: %s (%.1f s)",
            entry.phase,
            entry.epoch,
            entry.epochs_planned,
            scores,
            entry.seconds,
        )
        update_progress_artifact(
            self.artifact_id,
            100.0 * entry.epoch / entry.epochs_planned,
            description=f"fine-tuning: epoch {entry.epoch} "
            f"(phase {entry.phase}) val_loss "
            f"{entry.metrics.get('val_loss', float('nan')):.4f}",
        )


@task(name="finetune", cache_policy=NO_CACHE, task_run_name="finetune-{settings.backbone}")
def finetune_task(
    manifest: Manifest,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    settings: FinetuneFlowSettings,
    run_dir: Path,
) -> RunReport:
    extras = {"skipped": [asdict(s) for s in manifest.skipped]}
    report = run_finetune(
        manifest,
        train_rows,
        test_rows,
        settings.finetune_settings(),
        run_dir,
        run_settings=settings.run_settings(),
        extras=extras,
        on_epoch=_EpochProgress(),
        # the validation rows are grouped like the test rows, or early stopping sees near-copies
        group_regex=settings.group_regex if settings.split == "grouped" else None,
    )
    publish_run(report, run_dir, "fine-tuning")
    return report


@flow(name="finetune", flow_run_name=_run_name)
def finetune_flow(settings: FinetuneFlowSettings) -> dict:
    """Scan, split, fine-tune (or resume) and write the run; returns a short summary."""
    began = time.perf_counter()
    settings, run_dir = resolve_run(settings)
    manifest = scan_task(settings.data, settings.limit_per_class, settings.labels)
    train, test = split_rows(
        manifest, settings.split, settings.test_size, settings.seed, settings.group_regex
    )
    report = finetune_task(manifest, train, test, settings, run_dir)
    entry = report.classifiers["finetune"]
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "accuracy": entry.accuracy,
        "tta": settings.tta,
        "epochs_run": entry.best_params["epochs_run"],
        "best_epoch": entry.best_params["best_epoch"],
        "resumes": report.extras["resumes"],
        "train_seconds": report.extras["train_seconds"],
        "seconds": time.perf_counter() - began,
        "class_names": manifest.class_names,
        "images_total": len(manifest.records),
        "images_skipped": len(manifest.skipped),
        "flow_run_id": str(flow_run.id),
    }
