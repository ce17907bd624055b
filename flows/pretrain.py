"""Pretrain a source model on a larger real dataset and register it in MLflow.

Run: python -m flows.pretrain configs/pretrain_pneumonia.yaml
A fine-tune config then starts from it with `model.weights: mlflow:/<model_name>@<alias>`,
or from the printed file with `model.weights: <path>` and `model.weights_sha256: <sha256>`.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from configs import PretrainConfig, load_pretrain_config
from flows.pipeline import evaluate, stage, train
from flows.run_links import link_runs, rename_runs, run_name
from tasks.preprocess import PreparedData
from tasks.pretrain import SourceModel, load_source_data, register_source_model, save_backbone
from tasks.register import tracking_run
from tasks.train import TrainResult


@stage(name="load-source-data")
def load_source(config: PretrainConfig) -> PreparedData:
    prepared = load_source_data(config.source, config.seed)
    counts = prepared.manifest["split"].value_counts().to_dict()
    get_run_logger().info("%s at %d px: %s", config.source.npz.name, config.source.resolution, counts)
    mlflow.log_params({"source_resolution": config.source.resolution, "source_dataset": config.source.npz.name})
    mlflow.log_metrics({f"source_{split}_images": count for split, count in counts.items()})
    return prepared


@stage(name="register-source")
def register_source(config: PretrainConfig, trained: TrainResult, run_id: str, run_dir: Path) -> SourceModel:
    path, sha256 = save_backbone(trained.model.cpu(), run_dir)
    source = register_source_model(config, run_id, path, sha256)
    get_run_logger().info("registered source model %s v%s (sha256 %s)", source.weights_uri,
                          source.version, sha256)
    return source


@flow(name="pretrain-source-model")
def pretrain_source_model(config_path: str) -> SourceModel:
    """Train a ResNet from random init on the source dataset, evaluate it, register its backbone."""
    config = load_pretrain_config(config_path)
    started = datetime.now(timezone.utc)
    with tracking_run(config, run_name=run_name(config.name, started)) as run_id:
        link_runs(config.name, config.registry, run_id, run_name(config.name, started))
        run_dir = config.run_dir / run_id
        prepared = load_source(config)
        trained = train(config, prepared, run_id)
        evaluate(config, trained, prepared, run_dir)
        source = register_source(config, trained, run_id, run_dir)
        rename_runs(run_id, run_name(config.name, started, source.version))
        return source


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain and register a medxfer source model")
    parser.add_argument("config", type=Path, help="YAML config, e.g. configs/pretrain_pneumonia.yaml")
    source = pretrain_source_model(str(parser.parse_args().config))
    print(f"model.weights: {source.weights_uri}   (v{source.version})\n"
          f"or model.weights: {source.backbone_path}\n   model.weights_sha256: {source.sha256}")


if __name__ == "__main__":
    main()
