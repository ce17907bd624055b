"""medxfer's deployments on a real Prefect server, with a real worker, as the ops team runs them.

The server is `prefect server start` (its own PREFECT_HOME and SQLite database, a free
loopback port), the deployments come from `make deploy` (prefect.yaml), and the flow runs are
executed by `prefect worker start --pool medxfer` (tests/ops_runs.py). These are the tests
that fail when a dependency breaks the scheduler (SQLAlchemy 2.1: no scheduled runs are ever
created) or the `/filter` endpoints (fastapi 0.151-0.154: 422 from `prefect work-pool ls` and
`prefect deploy`).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import onnx
import pytest
import yaml
from cronsim import CronSim
from mlflow import MlflowClient
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                            DeploymentFilter, FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterId,
                                            FlowRunFilterState, FlowRunFilterStateType, LogFilter,
                                            LogFilterFlowRunId)
from prefect.client.schemas.objects import Artifact, FlowRun, Log, StateType
from prefect.client.schemas.sorting import ArtifactSort, LogSort

from configs import CONFIG_DIR, load_config
from flows.gpu_slot import GPU_SLOT, HOLDING, RELEASING
from flows.run_links import FAILED_STAGE_TAG, FAILURE_REASON_TAG, MLFLOW_RUN_ID_PREFIX, MLFLOW_RUN_URL_PREFIX
from tasks.register import CHALLENGER, CHAMPION
from tests.ops_runs import PACS_SCAN, WORK_POOL, Deployed, OpsRuns
from tests.prefect_servers import REPO, error_lines

# Every deployment prefect.yaml defines, as `flow name/deployment name`.
SCHEDULED = {"train-pipeline/breast_ultrasound", "train-pipeline/chest_xray_age",
             "score-studies/breast_ultrasound", "pretrain-source-model/pretrain_pneumonia",
             "score-pacs/breast_ultrasound_pacs"}
ON_DEMAND = {"tune-hyperparameters/breast_ultrasound"}  # no schedule: an engineer starts a search
DEPLOYMENTS = SCHEDULED | ON_DEMAND
TRAINING_CONFIGS = {"train-pipeline/breast_ultrasound": "breast_ultrasound.yaml",
                    "train-pipeline/chest_xray_age": "chest_xray_age.yaml"}
MIN_SCHEDULED_RUNS = 3  # Prefect's scheduler keeps at least this many upcoming runs per deployment
RUN_NAME = re.compile(r"^breast_ultrasound \d{4}-\d\d-\d\d \d\d:\d\d UTC v(\d+)$")


def _deployments(deployed: Deployed) -> dict[str, object]:
    with deployed.server.client() as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}


def test_make_deploy_deploys_every_deployment_of_prefect_yaml_on_its_schedule(deployed):
    deployments = _deployments(deployed)
    assert set(deployments) == DEPLOYMENTS
    assert len(yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]) == len(DEPLOYMENTS)
    assert {d.work_pool_name for d in deployments.values()} == {WORK_POOL}
    for name, config_file in TRAINING_CONFIGS.items():  # the cron and timezone are the config's
        (schedule,) = deployments[name].schedules
        expected = load_config(CONFIG_DIR / config_file, check_paths=False).schedule
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (expected.cron, expected.timezone)
        assert schedule.active and deployments[name].global_concurrency_limit.limit == 1
    (scan,) = deployments[PACS_SCAN].schedules  # the PACS scan's is the config's pacs.scoring cron
    expected = load_config(CONFIG_DIR / "breast_ultrasound_pacs.yaml", check_paths=False).pacs.scoring
    assert (scan.schedule.cron, scan.schedule.timezone) == (expected.cron, expected.timezone)
    assert scan.active and deployments[PACS_SCAN].global_concurrency_limit.limit == 1
    assert deployments[PACS_SCAN].parameters == {"config_path": "configs/breast_ultrasound_pacs.yaml"}
    with deployed.server.client() as client:  # the GPU slot the train stage holds
        assert client.read_global_concurrency_limit_by_name(GPU_SLOT).limit == 1


def _scheduled_runs(deployed: Deployed, deployment_id) -> list[FlowRun]:
    with deployed.server.client() as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(), flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))


def test_the_scheduler_creates_the_next_runs_of_every_deployment(deployed):
    deployments = _deployments(deployed)
    deadline = time.monotonic() + 120  # the scheduler loop runs every 2 s here (60 s by default)
    while True:
        runs = {name: _scheduled_runs(deployed, d.id) for name, d in deployments.items() if name in SCHEDULED}
        if all(len(found) >= MIN_SCHEDULED_RUNS for found in runs.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {name: len(found) >= MIN_SCHEDULED_RUNS for name, found in runs.items()} == dict.fromkeys(
        SCHEDULED, True), f"scheduled runs per deployment: {({n: len(f) for n, f in runs.items()})}\n" \
                            f"server log errors: {error_lines(deployed.server.log())}"
    for name, found in runs.items():  # the next times of each cron schedule, in its timezone
        (schedule,) = deployments[name].schedules
        zone = ZoneInfo(schedule.schedule.timezone)
        starts = sorted(run.expected_start_time for run in found)[:MIN_SCHEDULED_RUNS]
        first = starts[0].astimezone(zone)
        following = CronSim(schedule.schedule.cron, first)
        assert [s.astimezone(zone) for s in starts[1:]] == [next(following) for _ in starts[1:]], name
        assert first > datetime.now(zone) and all(run.auto_scheduled for run in found)
        assert CronSim(schedule.schedule.cron, datetime.now(zone)).__next__() == first, name
    for name in ON_DEMAND:
        assert not deployments[name].schedules and not _scheduled_runs(deployed, deployments[name].id), name


def test_work_pool_and_deployment_listings_work(deployed):
    pools = deployed.server.cli("work-pool", "ls")  # answered 422 under fastapi 0.151-0.154
    assert WORK_POOL in pools.stdout and "process" in pools.stdout
    listed = deployed.server.cli("deployment", "ls")
    assert all(name in listed.stdout for name in DEPLOYMENTS)


# Artifact reads pass task_run_filter=None: an empty TaskRunFilter joins task runs and so
# drops the artifacts a flow makes outside a task (the MLflow link).
def _latest(deployed: Deployed, key: str) -> Artifact:
    with deployed.server.client() as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), flow_run_filter=FlowRunFilter(),
            task_run_filter=None, sort=ArtifactSort.CREATED_DESC, limit=1, offset=0)
    return artifact


def _run_artifacts(deployed: Deployed, run: FlowRun) -> list[Artifact]:
    with deployed.server.client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
            flow_run_filter=FlowRunFilter(), task_run_filter=None, limit=200, offset=0,
            sort=ArtifactSort.CREATED_DESC)


def _logs(deployed: Deployed, run: FlowRun) -> list[Log]:
    with deployed.server.client() as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                limit=200, sort=LogSort.TIMESTAMP_ASC)


def _completed(run: FlowRun, ops: OpsRuns) -> None:
    assert run.state.is_completed(), f"{run.name}: {run.state.message}\nworker log:\n{ops.worker.log()[-6000:]}"


def test_a_triggered_training_run_is_run_by_the_worker_and_registers_a_version(deployed, ops_runs):
    run, config = ops_runs.champion, ops_runs.config
    _completed(run, ops_runs)
    assert run.work_pool_name == WORK_POOL and run.infrastructure_pid  # the process worker started it
    assert str(run.id) in ops_runs.worker.log()
    client = MlflowClient(deployed.tracking_uri)
    name = config.registry.model_name
    version = client.get_model_version(name, "1")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    mlflow_run = client.get_run(version.run_id)

    # Names with date and version, the same in Prefect and MLflow.
    assert RUN_NAME.match(run.name)[1] == "1" and mlflow_run.info.run_name == run.name

    # The version says how good it is, why it was promoted, and where it came from.
    tags = version.tags
    assert tags["test_metric"] == "roc_auc"
    evaluated = client.get_metric_history(version.run_id, "test_roc_auc")[0].value  # before ops_runs raised it
    assert float(tags["test_roc_auc"]) == pytest.approx(evaluated, abs=5e-5)
    assert float(tags["test_roc_auc_ci_low"]) <= float(tags["test_roc_auc"]) <= float(tags["test_roc_auc_ci_high"])
    assert (tags["registered_as"], tags["promotion_reason"]) == (CHAMPION, "no champion yet")
    assert tags["prefect_flow_run_id"] == str(run.id)
    assert tags["prefect_flow_run_url"] == f"{deployed.server.url}/flow-runs/flow-run/{run.id}"
    onnx_file = client.download_artifacts(version.run_id, "onnx/model.onnx", str(deployed.root / "download"))
    metadata = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert tags["training_data_sha256"] == metadata["training_data_sha256"]
    assert version.description.startswith(f"Test roc_auc {tags['test_roc_auc']} (95% CI {tags['test_roc_auc_ci_low']} "
                                          f"to {tags['test_roc_auc_ci_high']}) on the held-out")
    assert "Registered as **champion**: no champion yet." in version.description
    assert f"[{run.id}]({tags['prefect_flow_run_url']})" in version.description

    # The flow run is tagged with its MLflow run, whose page a link artifact opens.
    experiment = mlflow_run.info.experiment_id
    url = f"{deployed.mlflow.url}/#/experiments/{experiment}/runs/{version.run_id}?workflowType=machine_learning"
    assert {f"{MLFLOW_RUN_ID_PREFIX}{version.run_id}", f"{MLFLOW_RUN_URL_PREFIX}{url}"} <= set(run.tags)
    (link,) = [a for a in _run_artifacts(deployed, run) if a.key == "breast-ultrasound-latest-mlflow-run"]
    assert link.data == f"[MLflow run {version.run_id}]({url})"
    assert mlflow_run.data.tags["prefect_flow_run_id"] == str(run.id)


def test_champion_and_latest_artifacts_stay_apart_after_a_challenger(deployed, ops_runs):
    _completed(ops_runs.champion, ops_runs)
    _completed(ops_runs.challenger, ops_runs)
    client = MlflowClient(deployed.tracking_uri)
    name = ops_runs.config.registry.model_name
    challenger = client.get_model_version(name, "2")
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert challenger.tags["registered_as"] == CHALLENGER
    assert re.fullmatch(r"test roc_auc \d\.\d{4} does not beat champion v1 \(1\.0000\)",
                        challenger.tags["promotion_reason"])
    assert RUN_NAME.match(ops_runs.challenger.name)[1] == "2"

    latest, champion = (_latest(deployed, f"breast-ultrasound-{role}-model-card") for role in ("latest", CHAMPION))
    assert latest.flow_run_id == ops_runs.challenger.id and champion.flow_run_id == ops_runs.champion.id
    assert latest.data.startswith(f"# Model card: {name} version 2 (challenger)\n")
    assert "**Challenger, not served.**" in latest.data
    assert champion.data.startswith(f"# Model card: {name} version 1 (champion)\n")
    assert "**Champion.** This version is the one served (alias `champion`): no champion yet." in champion.data
    evaluations = {role: _latest(deployed, f"breast-ultrasound-{role}-evaluation") for role in ("latest", CHAMPION)}
    assert evaluations["latest"].flow_run_id == ops_runs.challenger.id
    assert evaluations[CHAMPION].flow_run_id == ops_runs.champion.id


def _slot_holds(deployed: Deployed, run: FlowRun) -> tuple[datetime, datetime, datetime]:
    """(train task start, slot held from, slot released at) of a run's training."""
    with deployed.server.client() as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    (train,) = [task_run for task_run in task_runs if task_run.name.rsplit("-", 1)[0] == "train"]
    logs = [log for log in _logs(deployed, run) if log.task_run_id == train.id]
    held = next(log.timestamp for log in logs if log.message.startswith(HOLDING))
    released = next(log.timestamp for log in logs if log.message.startswith(RELEASING))
    return train.start_time, held, released


def test_two_trainings_never_hold_the_gpu_slot_together(deployed, ops_runs):
    trainings = (ops_runs.challenger, ops_runs.pretrain)
    for run in trainings:
        _completed(run, ops_runs)
    (first_start, first_held, first_released), (second_start, second_held, second_released) = sorted(
        (_slot_holds(deployed, run) for run in trainings), key=lambda holds: holds[1])
    # Both train stages were running at once, yet the slot went to one, then the other.
    assert second_start < first_released <= second_held
    assert first_held < first_released and second_held < second_released


def test_a_failed_run_states_its_stage_and_reason_in_prefect_and_mlflow(deployed, ops_runs):
    run = ops_runs.failed
    assert run.state.type == StateType.FAILED
    assert "NotEnoughData" in run.state.message
    client = MlflowClient(deployed.tracking_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name(ops_runs.failed_config.registry.experiment)
                                        .experiment_id], f"tags.prefect_flow_run_id = '{run.id}'")
    tags = mlflow_run.data.tags
    assert mlflow_run.info.status == "FAILED" and tags[FAILED_STAGE_TAG] == "preprocess"
    assert tags[FAILURE_REASON_TAG].startswith("NotEnoughData: ") and "(1000)" in tags[FAILURE_REASON_TAG]
    assert tags["mlflow.note.content"] == f"Failed in stage **preprocess**: {tags[FAILURE_REASON_TAG]}"
    # Named by date, without a version: none was registered.
    assert re.fullmatch(r"breast_ultrasound \d{4}-\d\d-\d\d \d\d:\d\d UTC", mlflow_run.info.run_name)
    assert run.name == mlflow_run.info.run_name


def test_the_imagenet_weights_warning_is_a_prefect_log_and_artifact(deployed, ops_runs):
    run = ops_runs.champion
    _completed(run, ops_runs)
    reason = ("ImageNet weights ResNet18_Weights.IMAGENET1K_V1 are not in "
              f"{deployed.root / 'torch-home' / 'hub' / 'checkpoints'} and could not be downloaded")
    warnings = [log.message for log in _logs(deployed, run) if log.level == 30]  # logging.WARNING
    assert any(message.startswith(reason) and message.endswith("trained from random initialisation instead")
               for message in warnings), warnings
    artifact = _latest(deployed, "breast-ultrasound-latest-weights")
    assert artifact.flow_run_id == ops_runs.challenger.id  # every run publishes it; the champion's is older
    champion_artifact = next(a for a in _run_artifacts(deployed, run) if a.key == "breast-ultrasound-latest-weights")
    assert champion_artifact.description == "Warning: configured weights not loaded"
    assert f"**Warning:** {reason}" in champion_artifact.data
    mlflow_run = MlflowClient(deployed.tracking_uri).get_run(MlflowClient(deployed.tracking_uri).get_model_version(
        ops_runs.config.registry.model_name, "1").run_id)
    assert mlflow_run.data.tags["weights_warning"].startswith(reason)


def test_the_server_log_has_no_error_line(deployed, ops_runs):
    log = deployed.server.log()
    assert "prefect server start" in log or "Configure Prefect to communicate with the server" in log
    assert error_lines(log) == []
