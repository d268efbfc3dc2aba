"""featurepipe against a real Prefect server: runs, tasks, artifacts, UI, deployments, schedules.

One `prefect server start` serves the whole module; every client is a subprocess pointed at it
(a flow run, `prefect deploy`, a process worker, `flows.serve`), as in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.serve import CLASSIFY_DEPLOYMENT, PIPELINE_DEPLOYMENT, build_deployments
from flows.settings import PipelineSettings, SettingsError
from tasks.runs.folder import read_report
from tests.conftest import write_image
from tests.prefect_server import (
    PREFECT,
    PrefectServer,
    start_process,
    start_server,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

REPO = Path(__file__).resolve().parents[2]
POOL = "featurepipe-pool"
TINY = {
    "backbone": "vgg16",
    "weights": "none",
    "image_size": 32,
    "layers": ["block2_pool"],
    "classifiers": ["logreg"],
    "pooling": "avg",
}
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    running = start_server(tmp_path_factory.mktemp("prefect-home"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 classes x 10 generated PNGs plus a store and a runs folder shared by the module."""
    root = tmp_path_factory.mktemp("tiny")
    for label, tint in (("cats", 0), ("dogs", 120)):
        for i in range(10):
            write_image(root / "images" / label / f"img_{i:02d}.png", seed=i + tint, tint=tint)
    return {"data": root / "images", "store": root / "store", "runs": root / "runs"}


def _run(
    args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 240
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{args[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def served(
    server: PrefectServer, tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """flows.serve with an every-minute cron and its own store; yields the process and its log.

    Started before the other tests (pipeline_run asks for it) so that its first slot, up to a
    minute away, passes while they run instead of being waited for at the end.
    """
    folder = tmp_path_factory.mktemp("served")
    settings = {**TINY, "store": str(folder / "store"), "runs": str(folder / "runs")}
    script = (
        "import json, sys; from pathlib import Path; "
        "from flows.serve import serve_deployments; "
        "serve_deployments(Path(sys.argv[1]), cron='* * * * *', **json.loads(sys.argv[2]))"
    )
    log = folder / "serve.log"
    process = start_process(
        [sys.executable, "-c", script, str(tiny["data"]), json.dumps(settings)],
        server.env,
        log,
        cwd=REPO,
    )
    yield process, log
    stop_process(process)


@pytest.fixture(scope="module")
def pipeline_run(
    server: PrefectServer, tiny: dict[str, Path], served: tuple[subprocess.Popen, Path]
) -> dict:
    """pipeline_flow on the tiny data in a client process, recorded by the module's server."""
    settings = {
        **TINY,
        "data": str(tiny["data"]),
        "store": str(tiny["store"]),
        "runs": str(tiny["runs"]),
    }
    script = (
        "import json, sys; from flows.pipeline import pipeline_flow; "
        "from flows.settings import PipelineSettings; "
        "summary = pipeline_flow(PipelineSettings(**json.loads(sys.argv[1]))); "
        "print(json.dumps(summary, default=str))"
    )
    result = _run([sys.executable, "-c", script, json.dumps(settings)], server.env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _final_flow_run(server: PrefectServer, flow_run_id: str, timeout: float) -> dict:
    def final() -> dict | None:
        run = server.request("GET", f"/flow_runs/{flow_run_id}")
        return run if run["state_type"] in FINAL_STATES else None

    return wait_until(final, timeout, f"flow run {flow_run_id} to finish", interval=2)


def _task_runs(server: PrefectServer, flow_run_id: str) -> dict[str, dict]:
    """Task runs of one flow run by task name (the part of the run name before the first '-')."""
    runs = server.filter("task_runs", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {run["name"].split("-")[0]: run for run in runs}


def test_serve_needs_a_dataset_and_a_valid_cron(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--data is required"):
        build_deployments(PipelineSettings())
    with pytest.raises(SettingsError, match="invalid cron expression 'nightly'"):
        build_deployments(PipelineSettings(data=tmp_path), cron="nightly")


def test_pipeline_run_recorded_with_tasks_and_artifacts(
    server: PrefectServer, pipeline_run: dict, tiny: dict[str, Path]
) -> None:
    flow_run = server.request("GET", f"/flow_runs/{pipeline_run['flow_run_id']}")
    assert flow_run["state_type"] == "COMPLETED"
    assert flow_run["name"] == "images-vgg16-block2_pool"
    tasks = _task_runs(server, flow_run["id"])
    assert set(tasks) >= {"scan", "extract", "reduce", "classify"}
    assert {name: run["state_type"] for name, run in tasks.items()} == dict.fromkeys(
        tasks, "COMPLETED"
    )
    assert tasks["extract"]["name"] == "extract-vgg16"
    assert tasks["classify"]["name"] == "classify-block2_pool"

    artifacts = server.filter(
        "artifacts", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
    )
    by_description = {artifact["description"]: artifact for artifact in artifacts}
    assert by_description["metrics block2_pool"]["type"] == "table"
    assert "logreg" in json.dumps(by_description["metrics block2_pool"]["data"])
    report = by_description["report block2_pool"]
    assert report["type"] == "markdown"
    run_dir = Path(pipeline_run["run_dir"]).resolve()
    assert f"# Run {run_dir.name}" in report["data"]
    assert "| class | precision | recall | F1 | support |" in report["data"]
    assert "| true \\ predicted | cats | dogs |" in report["data"]
    assert report["data"].count("](data:image/png;base64,") == _pictures(run_dir)
    assert f"`{run_dir}` on host" in report["data"] and "file://" not in report["data"]
    progress = [a for a in artifacts if a["type"] == "progress"]  # extraction's, reduce's
    assert [a["data"] for a in progress] == [100.0, 100.0]


def _pictures(run_dir: Path) -> int:
    """How many pictures a run's report shows: run-wide ones plus each classifier's."""
    report = read_report(run_dir)
    return len(report.images) + sum(len(entry.images) for entry in report.classifiers.values())


def _render(url: str, expected: str, profile: Path, attempts: int = 4) -> str:
    """The DOM after the UI's scripts ran, once it shows `expected` (or after `attempts`).

    The snapshot is taken when Chromium's virtual-time budget ends; on a busy machine an API
    answer can still be in flight then, so a page without the run is loaded again. The tall
    window matters: the runs list is virtualised and leaves off-screen rows out of the DOM.
    """
    for _ in range(attempts):
        result = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--window-size=1400,2000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        if expected in result.stdout:
            break
    return result.stdout


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="the UI test needs Chromium: apt-get install -y chromium (.ci/run installs it)",
)
def test_ui_shows_the_flow_run(server: PrefectServer, pipeline_run: dict, tmp_path: Path) -> None:
    flow_run = server.request("GET", f"/flow_runs/{pipeline_run['flow_run_id']}")
    runs_page = _render(f"{server.url}/runs", flow_run["name"], tmp_path / "profile")
    assert "Can't connect to Server API" not in runs_page
    assert flow_run["name"] in runs_page
    run_page = _render(
        f"{server.url}/runs/flow-run/{flow_run['id']}", flow_run["name"], tmp_path / "profile"
    )
    assert flow_run["name"] in run_page
    assert "Completed" in run_page

    artifacts = server.filter(
        "artifacts", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
    )
    report = next(a for a in artifacts if a["description"] == "report block2_pool")
    page = _render(f"{server.url}/artifacts/artifact/{report['id']}", "precision", tmp_path / "p")
    run_dir = Path(pipeline_run["run_dir"]).resolve()
    assert f"Run {run_dir.name}" in page
    tables = re.findall(r"<table.*?</table>", page, flags=re.S)
    headings = [re.findall(r"heading\">([^<]*)<", table) for table in tables]
    assert ["class", "precision", "recall", "F1", "support"] in headings
    assert ["true \\ predicted", "cats", "dogs"] in headings
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', page)) == _pictures(run_dir)


def test_deploy_all_and_worker_runs_classify(
    server: PrefectServer, pipeline_run: dict, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """deployments/prefect.yaml deploys as documented, and a process worker started elsewhere
    runs the classify deployment from the repository (proof that the pull step works)."""
    _run([PREFECT, "work-pool", "create", POOL, "--type", "process"], server.env)
    _run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        server.env,
    )
    deployments = {d["name"]: d for d in server.filter("deployments")}
    nightly, classify = deployments["nightly"], deployments["classify"]
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert nightly["work_pool_name"] == classify["work_pool_name"] == POOL
    assert nightly["pull_steps"] == classify["pull_steps"] == pull
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert classify["schedules"] == []
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline_flow"

    layer = TINY["layers"][0]
    settings = {
        "data": str(tiny["data"]),
        "store": str(tiny["store"]),
        "runs": str(tiny["runs"]),
        "classifiers": ["logreg"],
    }
    parameters = {
        "settings": settings,
        "feature_keys": [pipeline_run["layers"][layer]["feature_key"]],
    }
    worker = start_process(
        [PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
        {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        tmp_path / "worker.log",
        cwd=tmp_path,
    )
    try:
        created = server.request(
            "POST", f"/deployments/{classify['id']}/create_flow_run", {"parameters": parameters}
        )
        flow_run = _final_flow_run(server, created["id"], timeout=150)
    finally:
        stop_process(worker)
    assert flow_run["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert set(flow_run["tags"]) >= {"featurepipe", "classify"}
    tasks = _task_runs(server, flow_run["id"])
    assert set(tasks) == {"reduce", "classify"}
    assert all(run["state_type"] == "COMPLETED" for run in tasks.values())


def test_served_cron_schedule_creates_and_completes_a_run(
    server: PrefectServer, served: tuple[subprocess.Popen, Path]
) -> None:
    """flows.serve on an every-minute cron: the server schedules a run, the served process runs
    it; the classify deployment is served alongside, without a schedule."""
    process, log = served

    def served_run() -> dict | None:
        assert process.poll() is None, f"flows.serve exited:\n{log.read_text()[-3000:]}"
        deployments = {d["name"]: d for d in server.filter("deployments")}
        if PIPELINE_DEPLOYMENT not in deployments:
            return None
        runs = server.filter(
            "flow_runs",
            {
                "flow_runs": {
                    "deployment_id": {"any_": [deployments[PIPELINE_DEPLOYMENT]["id"]]},
                    "state": {"type": {"any_": sorted(FINAL_STATES)}},
                }
            },
        )
        return runs[0] if runs else None

    flow_run = wait_until(served_run, 150, "a scheduled run of the served pipeline", interval=2)
    assert flow_run["state_type"] == "COMPLETED", log.read_text()[-3000:]
    assert flow_run["auto_scheduled"]
    assert set(flow_run["tags"]) >= {"featurepipe", "nightly"}
    assert flow_run["name"] == "images-vgg16-block2_pool"
    deployments = {d["name"]: d for d in server.filter("deployments")}
    assert deployments[PIPELINE_DEPLOYMENT]["work_pool_name"] is None
    assert deployments[CLASSIFY_DEPLOYMENT]["schedules"] == []
