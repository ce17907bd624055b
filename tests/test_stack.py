"""The production stack on one host, for real, started as `make stack` starts it (`stack.host`):
PostgreSQL 15, moto's S3 server with IAM auth, the MLflow basic-auth server on PostgreSQL
with artifacts proxied to S3, the Prefect server on PostgreSQL with API auth, a process
worker and the inference service, each on a free loopback port, in a temporary home, with
generated secrets. moto stands in for MinIO or AWS S3, which cannot be installed here."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from uuid import UUID

import boto3
import httpx
import pandas as pd
import psycopg2
import pytest
from botocore.exceptions import ClientError
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from flows.events import PROMOTED
from flows.pipeline import train_pipeline
from flows.score import score_studies
from stack import automations, object_store, postgres
from stack.host import ORDER, Stack
from stack.processes import children_by_parent
from stack.settings import (CONFIG_ENV, REPO, SECRET_NAMES, SECRETS_FILE, StackSettings, ephemeral_environment,
                            load_secrets)

from tests.conftest import phi_strings, write_config

T = TypeVar("T")
MODEL = "stack-test-resnet18"
TRAINING, SCORING = "stack-training", "stack-scoring"
# Flow runs of this test: quick registry failures, so that a stopped MLflow server fails the
# register stage within seconds instead of after MLflow's default ~2 minutes of retries.
FAST_FAILING_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class WebhookSink:
    """A loopback HTTP server that keeps every JSON body POSTed to it: the alert channel."""

    def __init__(self):
        self.messages: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                sink.messages.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_children_by_parent_lists_a_started_process_under_this_one_and_no_other():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        listing = children_by_parent()
        assert child.pid in listing[os.getpid()]
        assert sum(child.pid in pids for pids in listing.values()) == 1
    finally:
        child.kill()
        child.wait()


def test_secrets_come_from_the_environment_or_are_made_once_and_kept_owner_only(tmp_path):
    given = {"MEDXFER_API_KEY": "from-the-environment"}
    first = load_secrets(tmp_path, given)
    assert set(first) == set(SECRET_NAMES) and first["MEDXFER_API_KEY"] == "from-the-environment"
    kept = tmp_path / SECRETS_FILE
    assert kept.stat().st_mode & 0o777 == 0o600
    assert "from-the-environment" not in kept.read_text()  # the operator's own secret is not copied
    assert load_secrets(tmp_path, given) == first  # a restarted stack finds the same passwords
    user, password = first["PREFECT_API_AUTH_STRING"].split(":")
    assert user == "medxfer" and len(password) >= 32


@pytest.fixture(scope="module")
def stack(breast_dicom_dir) -> Iterator[Stack]:
    """The whole stack; its service serves MODEL from a small training config, polled every 2 s."""
    home = Path(tempfile.mkdtemp(prefix="medxfer-stack-"))  # not under pytest's 0700 root: postgres must reach it
    config = write_config(home, breast_dicom_dir, model={"weights": "none"},  # a random backbone trains fully
                          train={"epochs": 1}, preprocess={"workers": 1},
                          evaluate={"bootstrap_samples": 100, "gradcam_images": 0},
                          export={"int8": False, "fp16": False, "parity_samples": 8},
                          registry={"model_name": MODEL, "io_retries": 1, "io_retry_delay_seconds": 1},
                          serve={"reload_seconds": 2})
    running = Stack(StackSettings.from_environment(ephemeral_environment(home) | {CONFIG_ENV: str(config)}))
    try:
        running.up()
        yield running
    finally:
        running.down()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def as_client(stack):
    """This process talks to the stack as a client would (`eval "$(python -m stack env)"`)."""
    env = stack.settings.client_environment()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
            yield env


def _listening_addresses(ports: set[int]) -> dict[int, set[str]]:
    """port -> the addresses a socket listens on it (from /proc/net/tcp and tcp6)."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                found.setdefault(int(port, 16), set()).add(address)
    return found


def test_every_server_is_healthy_on_loopback_and_refuses_requests_without_credentials(stack):
    settings, secrets = stack.settings, stack.settings.secrets
    statuses = stack.status()
    assert [status.name for status in statuses] == list(ORDER)
    assert all(status.healthy for status in statuses), statuses
    ports = settings.ports
    listening = _listening_addresses(set(ports.values()))
    assert set(listening) == set(ports.values())
    assert all(addresses == {"0100007F"} for addresses in listening.values()), listening  # 127.0.0.1 only

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=settings.host, port=ports["postgres"], user="mlflow", password="guess",
                         dbname="mlflow", connect_timeout=5)
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(host=settings.host, port=ports["postgres"], user=postgres.ADMIN_ROLE, dbname="postgres",
                         connect_timeout=5)

    s3_url = settings.url("object-store")
    object_store.client(s3_url, object_store.read_keys(stack.keys_file)).put_object(
        Bucket=settings.bucket, Key="probe.txt", Body=b"signed")
    unsigned = httpx.get(f"{s3_url}/{settings.bucket}/probe.txt")
    assert unsigned.status_code == 403 and b"signed" not in unsigned.content
    stranger = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="AKIAGUESS",
                            aws_secret_access_key="guess")
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        stranger.list_objects_v2(Bucket=settings.bucket)

    mlflow_url = settings.url("mlflow")
    search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=(settings.mlflow_user, "guess")).status_code == 401
    assert httpx.post(f"{mlflow_url}/api/2.0/mlflow/experiments/create", json={"name": "x"}).status_code == 401
    assert httpx.get(f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/0/x").status_code == 401

    api = settings.prefect_api_url
    assert httpx.post(f"{api}/flow_runs/filter", json={}).status_code == 401
    wrong = base64.b64encode(b"medxfer:guess").decode()
    assert httpx.post(f"{api}/deployments/filter", json={},
                      headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    user, password = secrets["PREFECT_API_AUTH_STRING"].split(":", 1)
    assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=(user, password)).status_code == 200

    predict = f"{settings.url('service')}/v1/predict"
    dicom = {"Content-Type": "application/dicom"}
    assert httpx.post(predict, content=b"x", headers=dicom).status_code == 401
    assert httpx.post(predict, content=b"x", headers=dicom | {"X-API-Key": "guess"}).status_code == 401

    # Trainings yield the CPUs to the servers: the worker and its session run at a lower weight.
    caller, worker = os.getpriority(os.PRIO_PROCESS, 0), stack.processes.pid("worker")
    assert os.getpriority(os.PRIO_PROCESS, stack.processes.pid("prefect-server")) == caller
    assert os.getpriority(os.PRIO_PROCESS, worker) == caller + settings.flow_run_nice == caller + 10
    assert _session_weight(worker) in (None, settings.flow_run_nice)

    # Secrets reach the servers through their environment only: no log holds one.
    logs = {path.name: path.read_text(errors="replace") for path in (settings.home / "logs").iterdir()}
    assert set(logs) == {f"{name}.log" for name in ORDER}
    leaked = {(name, secret) for name, text in logs.items() for secret in secrets.values() if secret in text}
    assert not leaked


def _session_weight(pid: int) -> int | None:
    """The nice value of the process's scheduling group (Linux autogroup); None without autogroup."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except FileNotFoundError:
        return None


def _task_states(flow_run_id: UUID) -> dict[str, list[str]]:
    """Stage name -> the state names of its task runs, oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)  # "model-card-e2b"
    return states


def _flow_run_state(flow_run_id: UUID):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _finished(flow_run_id: UUID):
    state = _flow_run_state(flow_run_id)
    return state if state.is_final() else None


def _events(settings: StackSettings, name: str) -> list[dict]:
    response = httpx.post(f"{settings.prefect_api_url}/events/filter", json={"filter": {"event": {"name": [name]}}},
                          auth=tuple(settings.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)), timeout=30)
    response.raise_for_status()
    return response.json()["events"]


def test_deployed_training_fails_in_register_notifies_and_its_retry_registers_without_retraining(
        stack, as_client, breast_dicom_dir, tmp_path):
    settings = stack.settings
    sink = WebhookSink()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    manifest = pd.read_csv(breast_dicom_dir / "manifest.csv")
    for rel in manifest.loc[manifest["split"] == "test", "path"][:3]:
        shutil.copyfile(breast_dicom_dir / rel, incoming / Path(rel).name)
    study = next(incoming.iterdir())
    try:
        training = train_pipeline.from_source(str(REPO), "flows/pipeline.py:train_pipeline").deploy(
            name=TRAINING, work_pool_name=settings.work_pool, tags=["medxfer", "training"],
            parameters={"config_path": str(settings.config)}, job_variables={"env": FAST_FAILING_CLIENT},
            build=False, push=False)
        score_studies.from_source(str(REPO), "flows/score.py:score_studies").deploy(
            name=SCORING, work_pool_name=settings.work_pool, tags=["medxfer", "scoring"],
            parameters={"config_path": str(settings.config), "input_dir": str(incoming)}, build=False, push=False)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(automations.WEBHOOK_URL_ENV, sink.url)
            created = automations.create(automations.notification_block_id(), automations.scoring_deployments())
        assert created == ["medxfer: flow run failed", "medxfer: model promoted",
                           f"medxfer: rescore on promotion of {MODEL}"]

        run = run_deployment(f"train-pipeline/{TRAINING}", timeout=0)
        # The MLflow server goes away while the run registers its model.
        wait_for("the register stage to start", lambda: "register" in _task_states(run.id) or _finished(run.id),
                 timeout=600, interval=0.5)
        assert not _finished(run.id), _flow_run_state(run.id)
        # The training runs in the worker's session, at its niceness and its session's weight.
        worker = stack.processes.pid("worker")
        (flow_run,) = children_by_parent().get(worker, [])
        assert os.getsid(flow_run) == os.getsid(worker) == worker
        assert os.getpriority(os.PRIO_PROCESS, flow_run) == os.getpriority(os.PRIO_PROCESS, worker)
        assert _session_weight(flow_run) in (None, settings.flow_run_nice)
        stack.processes.stop(stack.service("mlflow"))
        failed = wait_for("the run to fail", lambda: _finished(run.id), timeout=300)
        assert failed.type is StateType.FAILED, failed
        stages = _task_states(run.id)
        assert stages["train"] == ["Completed"] and stages["register"][-1] == "Failed", stages

        alert = wait_for("the failure alert", lambda: [m for m in sink.messages if "Failed" in m["subject"]],
                         timeout=120)[0]
        with get_client(sync_client=True) as client:
            name = client.read_flow_run(run.id).name  # the flow may rename its run
        assert alert["subject"] == f"medxfer: {name} Failed in stage register"
        body = alert["body"]
        assert f"Deployment: train-pipeline/{TRAINING}" in body
        assert f"Flow run: {name} ({run.id}), attempt 1" in body
        assert "Stage: register" in body
        assert "Reason: Flow run encountered an exception: MlflowException: API request to" in body
        assert "Connection refused" in body
        assert f"/runs/flow-run/{run.id}" in body
        assert not {value for value in phi_strings(breast_dicom_dir) if value in json.dumps(alert)}

        stack.up(("mlflow",))
        with get_client(sync_client=True) as client:  # what the UI's Retry button sends
            client.set_flow_run_state(run.id, Scheduled(name="AwaitingRetry", message="Retry from the UI"),
                                      force=False)
        done = wait_for("the retried run to finish", lambda: _finished(run.id), timeout=600)
        assert done.type is StateType.COMPLETED, done
        stages = _task_states(run.id)
        for name in ("ingest", "preprocess", "train", "domain", "evaluate", "explain", "export"):
            assert stages[name] == ["Completed", "Cached"], (name, stages)
        assert stages["register"][-1] == "Completed" and stages["model-card"] == ["Completed"], stages

        mlflow = MlflowClient(settings.url("mlflow"))
        champion = mlflow.get_model_version_by_alias(MODEL, "champion")
        training_run = mlflow.get_run(champion.run_id)
        assert training_run.info.status == "FINISHED"
        assert training_run.data.tags["prefect_flow_run_id"] == str(run.id)  # one MLflow run across both attempts
        assert len(mlflow.get_metric_history(champion.run_id, "val_metric")) == 1  # trained once
        assert champion.tags["onnx_uri"].startswith(f"runs:/{champion.run_id}/onnx/")
        keys = object_store.read_keys(stack.keys_file)
        stored = object_store.client(settings.url("object-store"), keys).list_objects_v2(Bucket=settings.bucket)
        assert any(item["Key"].endswith(f"{champion.run_id}/artifacts/onnx/model.onnx") for item in stored["Contents"])

        (promoted,) = [event for event in _events(settings, PROMOTED)
                       if event["payload"]["version"] == champion.version]
        assert promoted["payload"]["model"] == MODEL and promoted["payload"]["metric"] == "roc_auc"
        assert promoted["payload"]["value"] == training_run.data.metrics["test_roc_auc"]
        wait_for("the promotion alert", lambda: any(m["subject"] == f"medxfer: {MODEL} v{champion.version} is the "
                                                                    f"new champion" for m in sink.messages), 120)

        # The service follows the champion; scoring reruns on the promotion (automation).
        service = settings.url("service")
        ready = wait_for("the service to load the champion",
                         lambda: (httpx.get(f"{service}/readyz").json()["model"] or {}).get("version"), 60)
        assert ready == champion.version
        answer = httpx.post(f"{service}/v1/predict", content=study.read_bytes(), timeout=60,
                            headers={"Content-Type": "application/dicom", "X-API-Key": settings.secrets["MEDXFER_API_KEY"]})
        assert answer.status_code == 200 and answer.json()["model"]["version"] == champion.version
        with get_client(sync_client=True) as client:
            scoring = client.read_deployment_by_name(f"score-studies/{SCORING}")
            rescored = wait_for("the rescoring run", lambda: client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[scoring.id]))), 120)
        scored = wait_for("the rescoring run to finish", lambda: _finished(rescored[0].id), 300)
        assert scored.type is StateType.COMPLETED, scored
    finally:
        sink.stop()
