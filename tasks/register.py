"""Register: the MLflow run, the model registry, and the champion/challenger aliases."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from configs import ModelRunConfig, PipelineConfig
from tasks.evaluate import shown_without_skill
from tasks.export import update_metadata
from tasks.io import sha256_file

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"
ONNX_ARTIFACT_DIR = "onnx"
TEST_METRIC_PREFIX = "test_"
# Never leaves the machine: hashes made with a known salt could be reversed.
SECRET_FIELDS = {"data": {"patient_salt"}, "tune": {"storage"}}  # a storage URL may hold a password
# Pinned so logging the model does not spend minutes inferring an environment.
MODEL_PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "torchvision"]
FLOW_RUN_TAG = "prefect_flow_run_id"  # on the MLflow run: the Prefect flow run it belongs to


def redacted_params(config: ModelRunConfig) -> dict[str, str]:
    """Flattened config for MLflow params; the patient salt never leaves the machine."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json", exclude=SECRET_FIELDS))
    return flat


@contextmanager
def tracking_run(config: ModelRunConfig, run_name: str, flow_run_id: str | None = None) -> Iterator[str]:
    """An MLflow run for the pipeline (or pretraining); yields its id, marks it FAILED if the block raises.

    With `flow_run_id` (the Prefect flow run this is part of), the run tagged with it is
    continued if there is one: a retried flow run keeps its MLflow run, its run id and so its
    output folder, and the stages it does not repeat stay logged there. Otherwise a new run
    is tagged with it."""
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    if mlflow.get_experiment_by_name(config.registry.experiment) is None:
        try:
            mlflow.create_experiment(config.registry.experiment, artifact_location=config.artifact_location())
        except MlflowException as exc:  # runs started together on a new server: one creates it
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow.set_experiment(config.registry.experiment)
    resumed = _run_of_flow_run(experiment.experiment_id, flow_run_id) if flow_run_id else None
    run = mlflow.start_run(run_id=resumed, run_name=None if resumed else run_name,
                           tags={FLOW_RUN_TAG: flow_run_id} if flow_run_id and not resumed else None)
    try:
        if resumed is None:
            mlflow.log_params(redacted_params(config))
        yield run.info.run_id
    except BaseException:
        try:
            mlflow.end_run("FAILED")
        except MlflowException as exc:  # the registry may be what failed: keep the first error
            log.warning("could not mark MLflow run %s FAILED: %s", run.info.run_id, exc)
        raise
    mlflow.end_run()


def _run_of_flow_run(experiment_id: str, flow_run_id: str) -> str | None:
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.{FLOW_RUN_TAG} = '{flow_run_id}'",
                              max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    run_id: str
    is_champion: bool
    reason: str
    onnx_uri: str
    metric: str  # the primary test metric promotion compares
    metric_value: float

    @property
    def role(self) -> str:
        """What the version became at registration: champion, or challenger only."""
        return CHAMPION if self.is_champion else CHALLENGER


@dataclass(frozen=True)
class Provenance:
    """Where a version came from, written on the model version for whoever reads the registry."""

    training_data_sha256: str
    flow_run_id: str | None = None  # the Prefect flow run that trained it, when there was one
    flow_run_url: str | None = None


def version_tags(metric: str, metrics: dict[str, float], confidence: float, registration: Registration,
                 provenance: Provenance) -> dict[str, str]:
    """The model version's tags: the test metric with its interval, the promotion and its
    reason, the Prefect flow run and the training data's hash."""
    prefix = TEST_METRIC_PREFIX + metric
    tags = {"test_metric": metric, prefix: f"{metrics[prefix]:.4f}", "confidence": f"{confidence:g}",
            "registered_as": registration.role, "promotion_reason": registration.reason,
            "training_data_sha256": provenance.training_data_sha256,
            FLOW_RUN_TAG: provenance.flow_run_id or "none",
            "prefect_flow_run_url": provenance.flow_run_url or "none"}
    for bound in ("ci_low", "ci_high"):
        if f"{prefix}_{bound}" in metrics:
            tags[f"{prefix}_{bound}"] = f"{metrics[f'{prefix}_{bound}']:.4f}"
    return tags


def version_description(tags: dict[str, str]) -> str:
    """The model version's description (markdown, shown on its MLflow page), from its tags."""
    metric = tags["test_metric"]
    value = tags[TEST_METRIC_PREFIX + metric]
    low, high = tags.get(f"{TEST_METRIC_PREFIX}{metric}_ci_low"), tags.get(f"{TEST_METRIC_PREFIX}{metric}_ci_high")
    interval = f" ({float(tags['confidence']):.0%} CI {low} to {high})" if low and high else ""
    run = tags[FLOW_RUN_TAG]
    trained_by = (f"[{run}]({tags['prefect_flow_run_url']})" if tags["prefect_flow_run_url"] != "none" else run)
    return (f"Test {metric} {value}{interval} on the held-out, patient-disjoint test split.\n\n"
            f"Registered as **{tags['registered_as']}**: {tags['promotion_reason']}.\n\n"
            f"Prefect flow run: {trained_by}. Training data sha256 `{tags['training_data_sha256']}`.")


def champion_metric(client: MlflowClient, name: str, metric: str) -> tuple[str, float] | None:
    """(version, test metric) of the current champion, or None if there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = client.get_run(version.run_id).data.metrics.get(TEST_METRIC_PREFIX + metric)
    return (version.version, value) if value is not None else None


def beats(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model `name` unless it exists."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def onnx_tag(variant: str | None = None) -> str:
    """Model-version tag holding the runs:/ URI of the main ONNX file or of a variant."""
    return f"onnx_{variant}_uri" if variant else "onnx_uri"


def register_model(config: PipelineConfig, run_id: str, model: torch.nn.Module, onnx_path: Path,
                   metric: str, higher_is_better: bool, example: torch.Tensor,
                   onnx_variants: dict[str, Path] | None = None,
                   provenance: Provenance | None = None) -> Registration:
    """Log model and ONNX files to the run, create a registry version, and move the aliases.

    A version becomes champion when it beats the champion's test metric (or there is none),
    unless its test interval shows it no better than a model without skill
    (`tasks.evaluate.shown_without_skill`, with `registry.require_skill`): such a version is never served.

    `onnx_path` is the main ONNX file (tag `onnx_uri`); each of `onnx_variants`
    (e.g. normalised, int8, fp16) is logged beside it and tagged `onnx_<name>_uri`.
    With `provenance`, the version gets a description and tags saying how good it is,
    why it was or was not promoted, and where it came from (`version_tags`).
    The version is deleted again if any later step fails, so a failed run leaves
    no version behind; one that an interrupted attempt of this run could not delete (the
    registry was down) is deleted when the attempt is retried.
    """
    client = MlflowClient(config.registry.tracking_uri)
    name = config.registry.model_name
    run_metrics = client.get_run(run_id).data.metrics
    new_value = run_metrics[TEST_METRIC_PREFIX + metric]
    _delete_unfinished_versions(client, name, run_id)
    active = mlflow.active_run()
    in_run = nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id)
    with in_run:
        # MLflow 3 saves a torch.export (pt2) graph traced on this example: no pickled code.
        info = mlflow.pytorch.log_model(model.eval(), name=MODEL_ARTIFACT, input_example=example.numpy(),
                                        pip_requirements=MODEL_PIP_REQUIREMENTS)
    ensure_registered_model(client, name)
    version = client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id)
    try:
        for variant, path in {None: onnx_path, **(onnx_variants or {})}.items():
            update_metadata(path, {"model_name": name, "model_version": str(version.version)})
            client.log_artifact(run_id, str(path), ONNX_ARTIFACT_DIR)
            client.set_model_version_tag(name, version.version, onnx_tag(variant),
                                         f"runs:/{run_id}/{ONNX_ARTIFACT_DIR}/{path.name}")
        onnx_uri = f"runs:/{run_id}/{ONNX_ARTIFACT_DIR}/{onnx_path.name}"
        client.set_model_version_tag(name, version.version, "onnx_sha256", sha256_file(onnx_path))
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        current = champion_metric(client, name, metric)
        without_skill = shown_without_skill(run_metrics, metric) if config.registry.require_skill else None
        if without_skill is not None:  # never served, even as the first version
            promote, reason = False, without_skill
        elif current is None:
            promote, reason = True, "no champion yet"
        else:
            promote = beats(new_value, current[1], higher_is_better)
            verdict = "beats" if promote else "does not beat"
            reason = (f"test {metric} {new_value:.4f} {verdict} champion v{current[0]} "
                      f"({current[1]:.4f})")
        registration = Registration(name, str(version.version), run_id, promote, reason, onnx_uri, metric, new_value)
        if provenance is not None:
            tags = version_tags(metric, run_metrics, config.evaluate.confidence, registration, provenance)
            for key, value in tags.items():
                client.set_model_version_tag(name, version.version, key, value)
            client.update_model_version(name, version.version, description=version_description(tags))
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        raise
    log.info("registered %s v%s; %s: %s", name, version.version,
             "champion" if promote else "challenger only", reason)
    return registration


def _delete_unfinished_versions(client: MlflowClient, name: str, run_id: str) -> None:
    """Versions of `name` made from `run_id` that hold no alias: left by an attempt that
    failed before moving the aliases, so never served. A version with an alias is kept."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if not version.aliases:
            log.info("deleting %s v%s, left unfinished by an earlier attempt", name, version.version)
            client.delete_model_version(name, version.version)
