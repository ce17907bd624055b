"""What the pipeline's stages share (flows/stages.py), without a server: which errors are
retried, and the cache keys that make a retried flow run resume."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

import botocore.exceptions
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
                                          TEMPORARILY_UNAVAILABLE)

from flows.pipeline import register, train
from flows.stages import ResumeInFlowRun, is_transient


@pytest.mark.parametrize("error, transient", [
    (MlflowException("API request to http://x failed with exception ConnectionError"), True),  # 500
    (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
    (MlflowException("server error", error_code=INTERNAL_ERROR), True),
    (MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST), False),
    (MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), False),
    (requests.ConnectionError("refused"), True),
    (ConnectionRefusedError(111, "refused"), True),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), True),
    (ValueError("a bug"), False),
    (None, False),
])
def test_only_connection_and_server_errors_are_retried(error, transient):
    assert is_transient(error) is transient


def _key(stage, flow_run_id, **inputs) -> str:
    context = SimpleNamespace(task=stage, task_run=SimpleNamespace(flow_run_id=flow_run_id, id=uuid4()))
    return ResumeInFlowRun().compute_key(context, inputs, {})


def test_a_retry_of_the_same_flow_run_finds_the_same_key_and_no_other_run_does(breast_config, tmp_path):
    run, other = uuid4(), uuid4()
    inputs = {"config": breast_config, "prepared": object(), "run_id": "abc"}
    key = _key(train, run, **inputs)
    assert key.startswith(f"{run}/train-")  # one folder per flow run, removed when it completes
    assert _key(train, run, **inputs | {"prepared": object()}) == key  # stage results are not hashed
    assert _key(train, other, **inputs) != key
    assert _key(register, run, **inputs) != key
    changed = breast_config.model_copy(update={"seed": breast_config.seed + 1})
    assert _key(train, run, **inputs | {"config": changed}) != key
