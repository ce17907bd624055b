"""What ties a Prefect flow run to its MLflow run, for the ops team: names that say when and
what, tags and links both ways, and a failed stage's reason recorded on the MLflow run.

Prefect flow runs otherwise get random names ("crimson-fox") and MLflow runs one name per
config; an operator looking at a failed Sunday retraining should find its other half in
one click.
"""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

import mlflow
from prefect import Task, get_client, runtime
from prefect.artifacts import create_link_artifact
from prefect.client.schemas.objects import State, TaskRun

from configs import RegistryConfig
from tasks.register import FLOW_RUN_TAG

# MLflow tags on the run (and, for the flow run's, on the model version).
PREFECT_FLOW_RUN_URL_TAG = "prefect_flow_run_url"  # beside tasks.register.FLOW_RUN_TAG
FAILED_STAGE_TAG, FAILURE_REASON_TAG = "failed_stage", "failure_reason"
MLFLOW_NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
# Artifact keys: `<config>-latest-<what>` is every run's; `<config>-champion-<what>` is only
# replaced by a run whose model became champion, so the two never mix.
LATEST = "latest"
# Prefect flow-run tags: "mlflow-run-id:<id>" and "mlflow-run:<url>".
MLFLOW_RUN_ID_PREFIX, MLFLOW_RUN_URL_PREFIX = "mlflow-run-id:", "mlflow-run:"
MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8,000 characters; the first line matters most
# MLflow 3.17's UI opens in its GenAI layout, where a training run's page never loads: links
# ask for the classic "Model training" view (the switch at the top of the UI's side bar).
CLASSIC_VIEW = "?workflowType=machine_learning"


def artifact_key(config_name: str, *parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes): `breast-ultrasound-latest-model-card`."""
    return "-".join([config_name.replace("_", "-").lower(), *parts])


def run_name(config_name: str, started: datetime, version: str | None = None) -> str:
    """`breast_ultrasound 2025-06-01 02:00 UTC`, plus ` v7` once the model version is known."""
    name = f"{config_name} {started.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"
    return f"{name} v{version}" if version else name


def mlflow_run_url(registry: RegistryConfig, run_id: str) -> str | None:
    ui = registry.mlflow_ui_url()
    if ui is None:
        return None
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}{CLASSIC_VIEW}"


def model_version_url(registry: RegistryConfig, name: str, version: str) -> str | None:
    ui = registry.mlflow_ui_url()
    return f"{ui}/#/models/{name}/versions/{version}" if ui else None


def flow_run_links() -> tuple[str | None, str | None]:
    """(id, UI URL) of the Prefect flow run this code runs in, or (None, None) outside one."""
    return runtime.flow_run.id, runtime.flow_run.ui_url


def link_runs(config_name: str, registry: RegistryConfig, run_id: str, name: str) -> None:
    """Name the Prefect flow run and the MLflow run `name`; tag each with the other's id and URL;
    a link artifact on the flow run (`<config>-latest-mlflow-run`) opens the MLflow run."""
    flow_run_id, flow_run_url = flow_run_links()
    mlflow.set_tags({FLOW_RUN_TAG: flow_run_id or "none", PREFECT_FLOW_RUN_URL_TAG: flow_run_url or "none"})
    url = mlflow_run_url(registry, run_id)
    if flow_run_id is None:
        return
    tags = [f"{MLFLOW_RUN_ID_PREFIX}{run_id}"] + ([f"{MLFLOW_RUN_URL_PREFIX}{url}"] if url else [])
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(UUID(flow_run_id))
        client.update_flow_run(current.id, name=name, tags=[*current.tags, *tags])
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key=artifact_key(config_name, LATEST, "mlflow-run"),
                             description="The MLflow run of this flow run")


def rename_runs(run_id: str, name: str) -> None:
    """Rename the MLflow run and, inside a flow run, the Prefect flow run."""
    mlflow.MlflowClient().update_run(run_id, name=name)
    flow_run_id = runtime.flow_run.id
    if flow_run_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(flow_run_id), name=name)


def record_failed_stage(task: Task, task_run: TaskRun, state: State) -> None:
    """Task on_failure hook: the stage and its reason as tags (and description) on the active
    MLflow run, which the flow then marks FAILED."""
    run = mlflow.active_run()
    if run is None:
        return
    error = state.result(raise_on_failure=False)
    reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (state.message or "")
    mlflow.set_tags({FAILED_STAGE_TAG: task.name, FAILURE_REASON_TAG: reason[:MAX_TAG_CHARS],
                     MLFLOW_NOTE_TAG: f"Failed in stage **{task.name}**: {reason}"[:MAX_TAG_CHARS]})
