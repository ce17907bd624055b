"""What every pipeline stage shares: results kept so that a retried flow run resumes where
it stopped, retries with backoff for stages that only do registry I/O, and the flow-run
label that names the stage a run is in (which the failure notification quotes).

A stage's result is persisted (Prefect's result storage: PREFECT_LOCAL_STORAGE_PATH, or a
storage block) under a key made of the flow run id, the stage's code and its small inputs
(the config, folders, run ids). Retrying a failed or crashed flow run, from the UI or the
API, gives the same keys: every stage that completed comes back Cached, with its result,
and the run restarts at the stage that failed. Any other flow run has other keys, so a
new run always trains on the data as it is. A run's results are removed when it completes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import requests
from mlflow.exceptions import MlflowException
from pydantic import BaseModel
from prefect import Task, get_client, task
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE, CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.results import get_result_store
from prefect.tasks import exponential_backoff

from configs import RegistryConfig
from flows.run_links import record_failed_stage

STAGE_LABEL = "medxfer.stage"  # the stage running now, or the one a failed or crashed run stopped in
# Inputs of these types are hashed into a stage's key: the config, folders, run ids, names.
# Stage results handed to later stages (dataclasses of models, arrays, tables) are not: they
# are large, and within one flow run they follow from the config anyway.
KEYED_INPUT_TYPES = (BaseModel, str, Path, int, float, bool, type(None))


def _keyed(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_keyed(item) for item in value)
    return isinstance(value, KEYED_INPUT_TYPES)


@dataclass
class ResumeInFlowRun(CachePolicy):
    """Key: `<flow run id>/<stage>-<hash of the stage's code and small inputs>`, so that one
    flow run's results share a folder and a retry of that run finds them."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        run = RUN_ID.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        small = {name: value for name, value in inputs.items() if _keyed(value)}
        stage = (TASK_SOURCE + INPUTS).compute_key(task_ctx, small, flow_parameters, **kwargs)
        return f"{run}/{task_ctx.task.name}-{stage}"


def _label_stage(task: Task, task_run: TaskRun, state: State) -> None:
    """on_running hook: the flow run's `medxfer.stage` label names this stage."""
    if task_run.flow_run_id is not None:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(task_run.flow_run_id, {STAGE_LABEL: task.name})


def stage(name: str, **options: Any):
    """A pipeline stage: a named Prefect task whose result a retry of its flow run reuses, and
    whose failure is recorded on the MLflow run (stage and reason)."""
    return task(name=name, cache_policy=ResumeInFlowRun(), persist_result=True, on_running=[_label_stage],
                on_failure=[record_failed_stage], **options)


def is_transient(error: BaseException | None) -> bool:
    """A failure worth another try: the registry answered 5xx or could not be reached, or the
    network or object store failed. A 4xx answer (no such model, bad credentials) is not."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500  # connection failures come wrapped as 500 too
    return isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                              botocore.exceptions.EndpointConnectionError,
                              botocore.exceptions.ConnectionClosedError))


def _retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def with_io_retries(stage_task: Task, registry: RegistryConfig) -> Task:
    """`stage_task` retried on transient I/O errors, `registry.io_retries` times, waiting
    `io_retry_delay_seconds`, then twice as long each time (with jitter). For stages whose
    work is registry and object-store I/O, so that a retry repeats no computation."""
    return stage_task.with_options(retries=registry.io_retries,
                                   retry_delay_seconds=exponential_backoff(registry.io_retry_delay_seconds),
                                   retry_jitter_factor=0.5, retry_condition_fn=_retry_transient)


def discard_results(flow_run_id: str) -> None:
    """Remove a completed flow run's stage results (nothing retries it any more). Only for
    local result storage; a bucket's lifecycle rule expires them elsewhere."""
    storage = get_result_store().result_storage
    if isinstance(storage, LocalFileSystem) and storage.basepath:
        shutil.rmtree(Path(storage.basepath).expanduser() / flow_run_id, ignore_errors=True)
