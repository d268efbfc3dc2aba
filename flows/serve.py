"""Serve featurepipe's deployments from one process: the single-machine alternative to a worker.

`prefect.serve` registers the deployments with the server and runs their flow runs as local
subprocesses, so no work pool, worker or `prefect deploy` is needed. deployments/prefect.yaml
declares the same deployments (flows, tags, schedule) for a work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from pydantic import ValidationError

from flows.pipeline import classify_flow, pipeline_flow
from flows.settings import PipelineSettings, SettingsError

NIGHTLY_CRON = "0 2 * * *"
# Not prefect.yaml's "nightly"/"classify": re-registering a work-pool deployment's name with
# serve() keeps its work pool and drops its code location in Prefect 3.8.8, and its runs then
# fail with "Downloading flow code from storage at None".
PIPELINE_DEPLOYMENT = "nightly-served"
CLASSIFY_DEPLOYMENT = "classify-served"


def _cron_schedule(cron: str) -> CronSchedule:
    """UTC like deployments/prefect.yaml, so both ways of deploying fire at the same time."""
    try:
        return CronSchedule(cron=cron, timezone="UTC")
    except ValidationError:
        raise SettingsError(f"invalid cron expression {cron!r} (e.g. '0 2 * * *')") from None


def build_deployments(
    settings: PipelineSettings, cron: str = NIGHTLY_CRON
) -> list[RunnerDeployment]:
    """The pipeline on `cron` and the classifier-only flow on demand, both defaulting to `settings`.

    Only the settings that were given become deployment parameters, so the flow's own defaults
    (not a copy frozen at serve time) apply to the rest.
    """
    if settings.data is None:
        raise SettingsError("--data is required: the dataset the scheduled pipeline runs on")
    parameters = settings.model_dump(mode="json", exclude_unset=True)
    pipeline = pipeline_flow.to_deployment(
        name=PIPELINE_DEPLOYMENT,
        schedules=[_cron_schedule(cron)],
        concurrency_limit=1,
        parameters={"settings": parameters},
        tags=["featurepipe", "nightly"],
        description="Scheduled scan -> extract -> reduce -> classify; only new images are "
        "extracted.",
    )
    classify = classify_flow.to_deployment(
        name=CLASSIFY_DEPLOYMENT,
        parameters={"settings": parameters},
        tags=["featurepipe", "classify"],
        description="Classifier stage only, on stored features (pass feature_keys from "
        "`featurepipe store ls`); never builds the backbone.",
    )
    return [pipeline, classify]


def serve_settings(settings: PipelineSettings, cron: str = NIGHTLY_CRON) -> None:
    """Register both deployments and run their flow runs here until interrupted (the CLI's entry).

    Stopping (Ctrl-C, SIGTERM) pauses both deployments, so no runs pile up while nothing serves.
    """
    serve(*build_deployments(settings, cron))


def serve_deployments(data: Path, cron: str = NIGHTLY_CRON, **settings: Any) -> None:
    """Serve the pipeline on `data` every `cron` (UTC) plus the classify flow, from Python."""
    serve_settings(PipelineSettings(data=data, **settings), cron)
