"""The training pipeline as a Prefect flow: (pacs-retrieve ->) ingest -> preprocess -> train -> domain
-> evaluate -> explain -> export -> register -> model card.

Each task is a thin wrapper over a pure function in `tasks/`: it writes the
stage's files, logs to MLflow and publishes what the ops team reads in the UI.
The model is exported and checked before it is registered, so the registry
never holds a version whose ONNX file failed its parity check.

Run: python -m flows.pipeline configs/breast_ultrasound.yaml
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import ModelRunConfig, PipelineConfig, load_config
from flows.dask_preprocess import preprocess_on_dask
from flows.events import emit_promoted
from flows.gpu_slot import gpu_slot
from flows.pacs_source import retrieve_training_data
from flows.run_links import (LATEST, artifact_key, flow_run_links, link_runs, model_version_url, rename_runs,
                             run_name)
from flows.stages import discard_results, stage, with_io_retries
from tasks.domain import DomainFit
from tasks.domain_eval import DomainEvaluation, fit_and_evaluate
from tasks.evaluate import Evaluation, evaluate_predictions, predict, primary_metric
from tasks.export import (CPU_PROVIDER, DEFAULT_THRESHOLD, ParityError, ServedDecode, serving_metadata,
                          training_data_sha256)
from tasks.gradcam import explain_test_cases
from tasks.ingest import IngestResult, ManifestError, NotEnoughData, check_enough_samples, ingest_dataset
from tasks.io import write_csv_atomic, write_text_atomic
from tasks.model_card import CardContext, model_card
from tasks.pacs.source import ingest_retrieved
from tasks.preprocess import PreparedData, preprocess_dataset
from tasks.qc import qc_report
from tasks.register import CHAMPION, SECRET_FIELDS, Provenance, Registration, register_model, tracking_run
from tasks.train import EpochResult, TrainResult, train_model
from tasks.transforms import PreprocessSpec
from tasks.variants import ServingModels, export_serving_models



def _report_rejects(config: PipelineConfig, run_dir: Path, rejects: pd.DataFrame, description: str) -> None:
    """rejects.csv (a file and an MLflow data/ artifact) and the Prefect rejects table."""
    write_csv_atomic(rejects, run_dir / "rejects.csv")
    mlflow.log_artifact(str(run_dir / "rejects.csv"), "data")
    create_table_artifact(key=artifact_key(config.name, "rejects"), description=description,
                          table=rejects.to_dict(orient="records")
                          or [{"path": "-", "kind": "-", "rows": "", "reason": "no rejects"}])


@stage(name="ingest")
def ingest(config: PipelineConfig, run_dir: Path, source_rejects: pd.DataFrame | None = None) -> IngestResult:
    """`source_rejects`: what the PACS could not give (data.source: pacs), counted with ingest's own."""
    try:
        if source_rejects is None:
            result = ingest_dataset(config.data, config.seed, config.patient_salt())
        else:
            result = ingest_retrieved(config.data, config.seed, config.patient_salt(), source_rejects)
    except (ManifestError, NotEnoughData) as exc:
        if exc.rejects is not None:  # files were examined: say which were dropped before stopping
            _report_rejects(config, run_dir, exc.rejects, f"Ingest stopped: {exc}")
        raise
    counts = result.summary()
    get_run_logger().info("ingest: %s", counts)
    write_csv_atomic(result.rejects, run_dir / "rejects_ingest.csv")
    mlflow.log_metrics({f"ingest_{k}": v for k, v in counts.items()})
    return result


@stage(name="preprocess")
def preprocess(config: PipelineConfig, ingested: IngestResult, run_dir: Path) -> PreparedData:
    if config.preprocess.dask_address is None:
        prepared = preprocess_dataset(ingested.manifest, config.data.root, config.preprocess)
    else:
        prepared = preprocess_on_dask(ingested.manifest, config.data.root, config.preprocess)
    rejects = prepared.rejects_with(ingested.rejects)
    usable_files = prepared.manifest["path"].nunique()  # `frames: all` gives several rows per file
    if ingested.discovered != usable_files + len(rejects):
        raise RuntimeError(f"counts do not reconcile: discovered {ingested.discovered}, "
                           f"usable {usable_files}, rejected {len(rejects)}")
    _report_rejects(config, run_dir, rejects,
                    f"Discovered {ingested.discovered} = usable {usable_files} + rejected {len(rejects)}")
    write_csv_atomic(prepared.manifest, run_dir / "manifest.csv")
    qc = qc_report(config.name, prepared.manifest, rejects, ingested.duplicates)
    write_text_atomic(run_dir / "qc_report.md", qc)
    for name in ("manifest.csv", "qc_report.md"):
        mlflow.log_artifact(str(run_dir / name), "data")
    create_markdown_artifact(key=artifact_key(config.name, "qc"), markdown=qc,
                             description="Data QC: header facts, rejects, duplicates, split sizes")
    mlflow.log_metrics({"usable": len(prepared.manifest), "rejected": len(rejects),
                        "cache_hits": prepared.cache_hits})
    check_enough_samples(prepared.manifest, config.data)  # after the reports, so the reasons are kept
    return prepared


@stage(name="train")
def train(config: ModelRunConfig, prepared: PreparedData, run_id: str) -> TrainResult:
    logger = get_run_logger()
    client = MlflowClient(config.registry.tracking_uri)

    def report(epoch: EpochResult) -> None:
        step = f"epoch {epoch.epoch}" if epoch.head_l2 is None else f"head fit {epoch.epoch} (L2 {epoch.head_l2:g})"
        logger.info("%s: train loss %.4f, val %s %.4f, %.1f images/s", step, epoch.train_loss,
                    primary_metric(config.task_spec.kind)[0], epoch.val_metric, epoch.images_per_second)
        for key in ("train_loss", "val_metric", "lr", "head_l2", "images_per_second", "data_seconds",
                    "compute_seconds"):
            if getattr(epoch, key) is not None:  # lr for image epochs, head_l2 for `head` fits
                client.log_metric(run_id, key, getattr(epoch, key), step=epoch.epoch)

    # Checkpoints live outside the MLflow run's folder: a re-run of a killed flow gets a new
    # run id but the same config and data, and resumes from there.
    with gpu_slot():  # two trainings never share the device
        result = train_model(config.model, config.train, config.task_spec, config.seed, prepared.split("train"),
                             prepared.split("val"), tracking_uri=config.registry.tracking_uri, on_epoch_end=report,
                             checkpoint_dir=config.run_dir / "checkpoints")
    if result.resumed_from_epoch:
        logger.info("resumed from a checkpoint at epoch %d", result.resumed_from_epoch)
    logger.info("backbone: %s; strategy %s (%s)", result.weights.describe(),
                result.strategy.value, result.strategy_reason)
    logger.info("precision %s, channels_last %s (%s)", result.precision, result.channels_last,
                result.precision_reason)
    _report_weights(config, result)
    mlflow.log_params({"weights_name": result.weights.name,
                       "weights_sha256": result.weights.sha256 or "none",
                       "weights_pretrained": result.weights.pretrained,
                       "freeze_strategy_used": result.strategy.value,
                       "freeze_reason": result.strategy_reason, "device": result.device,
                       "cached_features": result.cached_features, "precision_used": result.precision,
                       "precision_reason": result.precision_reason, "channels_last_used": result.channels_last,
                       "resumed_from_epoch": result.resumed_from_epoch})
    mlflow.log_metrics({"best_epoch": result.best_epoch, f"val_{result.metric_name}": result.best_metric,
                        "feature_cache_seconds": result.feature_seconds})
    return result


def _report_weights(config: ModelRunConfig, trained: TrainResult) -> None:
    """What the backbone started from, as an artifact every run; a warning (log, artifact and
    MLflow tag) when the configured weights could not be loaded."""
    weights, logger = trained.weights, get_run_logger()
    lines = [f"# Backbone weights: {config.name}", "", f"- Configured: `{config.model.weights}`",
             f"- Used: {weights.describe()}"]
    if weights.fallback_reason:
        logger.warning("%s: trained from random initialisation instead", weights.fallback_reason)
        mlflow.set_tag("weights_warning", weights.fallback_reason)
        lines += ["", f"**Warning:** {weights.fallback_reason}. This run trained from random initialisation, "
                  "which usually needs more data. Copy the weights file into `$TORCH_HOME/hub/checkpoints`, or "
                  "set `model.weights` to a local file with its `weights_sha256` (README, \"ImageNet weights\")."]
    elif not weights.pretrained:
        logger.warning("trained from random initialisation: no pretrained weights were used")
    create_markdown_artifact(key=artifact_key(config.name, LATEST, "weights"), markdown="\n".join(lines) + "\n",
                             description="Warning: configured weights not loaded" if weights.fallback_reason
                             else "Backbone weights used")


@dataclass(frozen=True)
class DomainResult:
    fit: DomainFit
    evaluation: DomainEvaluation


@stage(name="domain")
def domain(config: PipelineConfig, trained: TrainResult, prepared: PreparedData) -> DomainResult:
    """Fit the input-domain check on the training split, threshold it on validation, and
    evaluate it on the test split against the configured out-of-domain images."""
    fit, evaluation = fit_and_evaluate(config, trained.model, prepared)
    mlflow.log_params(fit.mlflow_params())
    mlflow.log_metrics(evaluation.mlflow_metrics())
    mlflow.log_dict(fit.check.as_dict(), "domain/domain_check.json")
    aurocs = [f"AUROC {g.group.value} {g.auroc:.3f} ({g.images} images)" for g in evaluation.groups]
    get_run_logger().info("domain check: threshold %.4g; test false rejections %.1f%%; %s", fit.check.threshold,
                          100 * evaluation.false_rejection, ", ".join(aurocs) or "no out-of-domain images")
    return DomainResult(fit, evaluation)


@stage(name="evaluate")
def evaluate(config: ModelRunConfig, trained: TrainResult, prepared: PreparedData, run_dir: Path,
             domain_evaluation: DomainEvaluation | None = None) -> Evaluation:
    """Test metrics and the evaluation report; with `domain_evaluation` (the pipeline's, not a
    source model's), the input-domain check's section too."""
    test, val = prepared.split("test"), prepared.split("val")
    spec = config.task_spec
    outputs, val_outputs = (predict(trained.model, split.images, config.train.batch_size, trained.device)
                            for split in (test, val))
    evaluation = evaluate_predictions(spec.kind, test.targets, outputs, run_dir / "plots",
                                      list(spec.label_names), spec.positive_index,
                                      config.evaluate, config.seed, validation=(val.targets, val_outputs),
                                      train_targets=prepared.targets("train"))
    mlflow.log_metrics(evaluation.mlflow_metrics())
    for plot in evaluation.plots:
        mlflow.log_artifact(str(plot), "plots")
    report = evaluation.markdown(f"{config.name}: test set ({len(test)} images)", list(spec.label_names))
    report += f"\n\nBackbone: {trained.weights.describe()}; strategy {trained.strategy.value}."
    if domain_evaluation is not None:
        report += f"\n\n## Input domain\n\n{domain_evaluation.body()}\n"
    write_text_atomic(run_dir / "evaluation.md", report)
    mlflow.log_artifact(str(run_dir / "evaluation.md"))
    create_markdown_artifact(key=artifact_key(config.name, LATEST, "evaluation"), markdown=report,
                             description="Held-out test metrics of the latest run")
    return evaluation


@stage(name="explain")
def explain(config: PipelineConfig, trained: TrainResult, prepared: PreparedData, run_dir: Path) -> list[str]:
    """Grad-CAM overlays for a few test images; returns their MLflow artifact paths."""
    test = prepared.split("test")
    paths = explain_test_cases(trained.model, test.images, test.targets, config.data.task,
                               config.data.label_names, run_dir / "gradcam", config.evaluate.gradcam_images,
                               config.data.positive_index, trained.device)
    for path in paths:
        mlflow.log_artifact(str(path), "gradcam")
    get_run_logger().info("Grad-CAM overlays for %d test images in %s", len(paths), run_dir / "gradcam")
    return [f"gradcam/{path.name}" for path in paths]


@stage(name="model-card")
def publish_model_card(config: PipelineConfig, trained: TrainResult, evaluation: Evaluation,
                       ingested: IngestResult, prepared: PreparedData, registration: Registration,
                       explained: list[str], run_dir: Path, domain_evaluation: DomainEvaluation) -> Path:
    rejected = ingested.discovered - prepared.manifest["path"].nunique()  # files, not frames
    context = CardContext(prepared.manifest, ingested.discovered, rejected, registration,
                          [f"plots/{plot.name}" for plot in evaluation.plots] + explained,
                          PreprocessSpec.from_config(config.preprocess), domain_evaluation)
    card = model_card(config, trained, evaluation, context)
    path = write_text_atomic(run_dir / "model_card.md", card)
    mlflow.log_artifact(str(path))
    described = f"{registration.model_name} v{registration.version} ({registration.role})"
    create_markdown_artifact(key=artifact_key(config.name, LATEST, "model-card"), markdown=card,
                             description=f"Model card of the latest run: {described}")
    if registration.is_champion:  # the champion's keys change only when the champion does
        create_markdown_artifact(key=artifact_key(config.name, CHAMPION, "model-card"), markdown=card,
                                 description=f"Model card of the champion: {described}")
        create_markdown_artifact(key=artifact_key(config.name, CHAMPION, "evaluation"),
                                 markdown=(run_dir / "evaluation.md").read_text(),
                                 description=f"Held-out test metrics of the champion: {described}")
    return path


@stage(name="export")
def export(config: PipelineConfig, trained: TrainResult, prepared: PreparedData, evaluation: Evaluation,
           run_dir: Path, domain_fit: DomainFit) -> ServingModels:
    """ONNX files checked against PyTorch on held-out test images; raises ParityError
    (after logging the reason as a run artifact) when the float32 graphs disagree."""
    data, pre, spec = config.data, config.preprocess, config.task_spec
    point = evaluation.operating_point  # chosen on validation (classification only)
    threshold = point.threshold if point else None
    metadata = serving_metadata(
        task=spec.kind, label_names=data.label_names, positive_index=spec.positive_index,
        operating_threshold=threshold, spec=PreprocessSpec.from_config(pre), metrics=evaluation.metrics,
        training_data=training_data_sha256(prepared.manifest), weights_name=trained.weights.name,
        weights_sha256=trained.weights.sha256 or "none", model_name=config.registry.model_name,
        voi_window=pre.voi_window, frames=pre.frames) | domain_fit.check.to_metadata()
    test = prepared.split("test")
    test_paths = prepared.manifest.loc[prepared.manifest["split"] == "test", "path"]
    decode = ServedDecode.from_metadata(metadata)  # as the service will: checks what the metadata says
    greys = [decode(Path(data.root) / rel) for rel in test_paths]
    models = export_serving_models(
        trained.model.cpu(), run_dir, metadata, config.export,
        train_crops=prepared.split("train").images, val_crops=prepared.split("val").images,
        test_crops=test.images, test_greys=greys, test_targets=test.targets,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold, positive_index=spec.positive_index,
        novelty=domain_fit.novelty, domain_threshold=domain_fit.check.threshold)
    write_text_atomic(run_dir / "onnx_parity.json", models.report_json())
    mlflow.log_artifact(str(run_dir / "onnx_parity.json"), "onnx")
    mlflow.log_metrics({f"onnx_{r.graph.replace('-', '_')}_max_abs_diff": r.max_abs_diff
                        for r in models.parity if r.provider == CPU_PROVIDER})
    mlflow.log_metrics({f"onnx_{r.graph.replace('-', '_')}_domain_max_rel_diff": r.domain_max_rel_diff
                        for r in models.parity if r.provider == CPU_PROVIDER and r.domain_max_rel_diff is not None})
    for accuracy in models.accuracy:
        mlflow.log_metrics({f"{accuracy.variant}_test_{k}": v for k, v in accuracy.metrics.items()})
    mlflow.set_tag("onnx_providers", ",".join(sorted({r.provider for r in models.parity})))
    logger = get_run_logger()
    for report in models.parity:
        logger.info("ONNX %s graph on %s: %s over %d test images", report.graph, report.provider,
                    report.verdict(), report.samples)
    if models.calibration:
        calibration = models.calibration
        mlflow.log_params({"int8_calibration_method": calibration.method,
                           "int8_calibration_images": calibration.images})
        logger.info("int8 calibrated on %d training crops with %s (mean |int8 - fp32| on validation: %s)",
                    calibration.images, calibration.method,
                    ", ".join(f"{k} {v:.2g}" for k, v in calibration.validation_mean_abs_diff.items()))
    for variant, reason in models.dropped.items():
        logger.warning("%s variant not kept: %s", variant, reason)
    if not models.passed:
        mlflow.set_tag("parity_failure", models.failure_reason())
        raise ParityError(f"ONNX output differs from PyTorch, model not registered: {models.failure_reason()}")
    return models


@stage(name="register")
def register(config: PipelineConfig, trained: TrainResult, models: ServingModels, run_id: str,
             prepared: PreparedData) -> Registration:
    example = prepared.example_input()
    metric, higher_is_better = primary_metric(config.data.task)
    flow_run_id, flow_run_url = flow_run_links()
    provenance = Provenance(training_data_sha256(prepared.manifest), flow_run_id, flow_run_url)
    registration = register_model(config, run_id, trained.model.cpu(), models.self_contained, metric,
                                  higher_is_better, example,
                                  onnx_variants={"normalised": models.normalised, **models.variants},
                                  provenance=provenance)
    url = model_version_url(config.registry, registration.model_name, registration.version)
    get_run_logger().info("registered %s version %s as %s (%s)%s", registration.model_name, registration.version,
                          registration.role, registration.reason, f": {url}" if url else "")
    if registration.is_champion:
        emit_promoted(registration)
    return registration


@dataclass(frozen=True)
class PipelineSummary:
    run_dir: Path
    onnx_path: Path
    registration: Registration
    test_metrics: dict[str, float]
    weights: str

    def text(self) -> str:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in self.test_metrics.items())
        role = "champion" if self.registration.is_champion else "challenger"
        return (f"model {self.registration.model_name} v{self.registration.version} "
                f"({role}: {self.registration.reason})\n"
                f"test: {metrics}\nbackbone: {self.weights}\n"
                f"ONNX: {self.onnx_path}\noutputs: {self.run_dir}")


@flow(name="train-pipeline")
def train_pipeline(config_path: str) -> PipelineSummary:
    """Ingest, preprocess, fine-tune, evaluate, export and register one dataset."""
    config = load_config(config_path)
    started = datetime.now(timezone.utc)
    with tracking_run(config, run_name=run_name(config.name, started), flow_run_id=runtime.flow_run.id) as run_id:
        link_runs(config.name, config.registry, run_id, run_name(config.name, started))
        run_dir = config.run_dir / run_id
        mlflow.log_text(yaml.safe_dump(config.model_dump(mode="json", exclude=SECRET_FIELDS)),
                        "config/config.yaml")
        source_rejects = retrieve_training_data(config, run_dir) if config.data.source == "pacs" else None
        ingested = ingest(config, run_dir, source_rejects)
        prepared = preprocess(config, ingested, run_dir)
        trained = train(config, prepared, run_id)
        checked = domain(config, trained, prepared)
        evaluation = evaluate(config, trained, prepared, run_dir, checked.evaluation)
        explained = explain(config, trained, prepared, run_dir)
        models = export(config, trained, prepared, evaluation, run_dir, checked.fit)
        registration = with_io_retries(register, config.registry)(config, trained, models, run_id, prepared)
        rename_runs(run_id, run_name(config.name, started, registration.version))
        with_io_retries(publish_model_card, config.registry)(config, trained, evaluation, ingested, prepared,
                                                             registration, explained, run_dir, checked.evaluation)
    summary = PipelineSummary(run_dir, models.self_contained, registration, evaluation.metrics,
                              trained.weights.describe())
    get_run_logger().info("pipeline finished\n%s", summary.text())
    discard_results(runtime.flow_run.id)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the medxfer training pipeline")
    parser.add_argument("config", type=Path, help="YAML config, e.g. configs/breast_ultrasound.yaml")
    args = parser.parse_args()
    train_pipeline(str(args.config))  # the flow logs its summary: where outputs are, test metrics


if __name__ == "__main__":
    main()
