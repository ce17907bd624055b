"""Session fixtures for the operations tests (test_prefect_server.py, test_ui_browser.py):
medxfer deployed on a real Prefect server the way the README says (`make deploy`), a real
process worker, a real MLflow UI over the runs' store, and the runs an ops team would see.

The runs, all through the worker from the deployments (parameters overridden as an
operator would, to point at the small real BreastMNIST test sample):
  - a training run, the first champion, and beside it a training run that fails (too few
    usable images; through the chest_xray_age deployment, since a deployment runs one flow
    run at a time);
  - then a second training run of the same config, after the champion's recorded test AUC
    was raised to 1.0 (a champion nothing can beat) so that it is a challenger whatever its
    own AUC, and beside it a pretraining run: both reach their train stage within seconds
    of each other, and the GPU slot must make one wait for the other.
ImageNet weights are configured and cannot be fetched (the worker's only route out is a
proxy on a closed port, as on an air-gapped site), so the fallback warning is real.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.schemas.objects import FlowRun

from configs import PipelineConfig, load_config
from stack.settings import free_port
from tasks.register import CHAMPION
from tests.conftest import write_config
from tests.mlflow_servers import MlflowServer, mlflow_server
from tests.prefect_servers import (PREFECT, REPO, LoggedProcess, PrefectServer, prefect_server,
                                   prefect_worker)

WORK_POOL = "medxfer"
TRAINING, OTHER_TRAINING = "train-pipeline/breast_ultrasound", "train-pipeline/chest_xray_age"
PRETRAINING = "pretrain-source-model/pretrain_pneumonia"
PACS_SCAN = "score-pacs/breast_ultrasound_pacs"  # every 15 minutes, on configs/breast_ultrasound_pacs.yaml's PACS
RUN_TIMEOUT_SECONDS = 900  # a busy 2-core machine; a run takes 1-2 minutes on an idle one


@dataclass
class Deployed:
    server: PrefectServer
    mlflow: MlflowServer
    tracking_uri: str  # the store the runs write and the MLflow UI reads
    deploy_output: str
    root: Path


@pytest.fixture(scope="session")
def deployed(tmp_path_factory) -> Iterator[Deployed]:
    """A real `prefect server start` with every deployment of prefect.yaml (`make deploy` from
    this checkout), and a real `mlflow server` over an empty SQLite store."""
    root = tmp_path_factory.mktemp("ops")
    (root / "registry").mkdir()
    tracking_uri = f"sqlite:///{root / 'registry' / 'mlflow.db'}"
    with mlflow_server(tracking_uri, root / "registry" / "artifacts", root / "mlflow-server.log") as ui, \
            prefect_server(root / "prefect") as server:
        deploy = subprocess.run(["make", "-s", "deploy", f"PREFECT={PREFECT}"], cwd=REPO, env=server.client_env,
                                capture_output=True, text=True, timeout=600)
        assert deploy.returncode == 0, f"make deploy failed:\n{deploy.stdout}\n{deploy.stderr}"
        yield Deployed(server, ui, tracking_uri, deploy.stdout, root)


@dataclass
class OpsRuns:
    champion: FlowRun  # the first training: v1, champion
    failed: FlowRun  # the training that stops in preprocess
    challenger: FlowRun  # the second training: v2, challenger
    pretrain: FlowRun  # started with the challenger: their train stages contend for the GPU slot
    config: PipelineConfig  # the trainings' config
    failed_config: PipelineConfig
    worker: LoggedProcess


def _offline(root: Path) -> dict[str, str]:
    """The worker's environment on an air-gapped site: no route out except loopback, an
    empty torch cache."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return {"HTTPS_PROXY": dead_proxy, "HTTP_PROXY": dead_proxy, "https_proxy": dead_proxy,
            "http_proxy": dead_proxy, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "TORCH_HOME": str(root / "torch-home")}


def _trigger(server: PrefectServer, deployment: str, config_path: Path) -> FlowRun:
    with server.client() as client:
        found = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(found.id, parameters={"config_path": str(config_path)})


def _wait_final(server: PrefectServer, worker: LoggedProcess, *runs: FlowRun) -> list[FlowRun]:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        with server.client() as client:
            current = [client.read_flow_run(run.id) for run in runs]
        if all(run.state and run.state.is_final() for run in current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"flow runs not finished after {RUN_TIMEOUT_SECONDS} s: "
                                 f"{[(r.name, r.state_name) for r in current]}\nworker log:\n{worker.log()[-6000:]}")
        time.sleep(2)


def _small_training_config(folder: Path, data_root: Path, tracking_uri: str, ui_url: str, **overrides) -> Path:
    """configs/breast_ultrasound.yaml on the test sample, cut down to minutes on a CPU (the domain
    check evaluated on pydicom-data's CR and MR files only, the same here and on CI)."""
    folder.mkdir()
    return write_config(folder, data_root, **{
        "model": {"weights": "imagenet"}, "train": {"epochs": 1, "batch_size": 16},
        "preprocess": {"workers": 1}, "evaluate": {"bootstrap_samples": 200, "gradcam_images": 2},
        "export": {"int8": False, "fp16": False},
        "domain": {"out_of_domain": [{"group": "other_modality", "pydicom": ["CR", "MR"]}]}, **overrides,
        "registry": {"tracking_uri": tracking_uri, "ui_url": ui_url}})


def _pretrain_config(folder: Path, tracking_uri: str) -> Path:
    """A source model pretrained on the bundled BreastMNIST images (real, 546 for training) at 32 px:
    its epoch lasts longer than the training started beside it takes to reach its own train stage."""
    folder.mkdir()
    raw = {"name": "pretrain_test", "output_dir": str(folder / "outputs"),
           "source": {"npz": str(REPO / "sample_data" / "breastmnist.npz"), "label_names": ["malignant", "benign"],
                      "resolution": 32},
           "train": {"epochs": 1, "batch_size": 32},
           "registry": {"tracking_uri": tracking_uri, "model_name": "test-source-resnet18"}}
    path = folder / "pretrain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def ops_runs(deployed, breast_dicom_dir) -> Iterator[OpsRuns]:
    root, server = deployed.root, deployed.server
    config_path = _small_training_config(root / "training", breast_dicom_dir, deployed.tracking_uri, deployed.mlflow.url)
    failing_path = _small_training_config(root / "failing", breast_dicom_dir, deployed.tracking_uri,
                                          deployed.mlflow.url, data={"min_usable_per_class": 1000})
    pretrain_path = _pretrain_config(root / "pretraining", deployed.tracking_uri)
    # There is no PACS here: the PACS scan is paused (its scheduled runs deleted) before the worker starts,
    # so the worker never runs a scan due while these runs take their minutes.
    with server.client() as client:
        client.pause_deployment(client.read_deployment_by_name(PACS_SCAN).id)
    with prefect_worker(server, WORK_POOL, **_offline(root)) as worker:
        champion, failed = _wait_final(server, worker, _trigger(server, TRAINING, config_path),
                                       _trigger(server, OTHER_TRAINING, failing_path))
        config = load_config(config_path)
        client = MlflowClient(deployed.tracking_uri)
        if champion.state.is_completed():  # else the tests report why; nothing to raise
            first = client.get_model_version_by_alias(config.registry.model_name, CHAMPION)
            client.log_metric(first.run_id, "test_roc_auc", 1.0, step=1)  # the latest value wins
        challenger, pretrain = _wait_final(server, worker, _trigger(server, TRAINING, config_path),
                                           _trigger(server, PRETRAINING, pretrain_path))
        yield OpsRuns(champion, failed, challenger, pretrain, config, load_config(failing_path), worker)
