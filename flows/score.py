"""Batch scoring: a folder of new studies scored by the registry's champion.

Run: python -m flows.score configs/breast_ultrasound.yaml /path/to/new/studies
Writes <output_dir>/<name>/scores/<flow run id>/scores.csv and score_rejects.csv,
and a Prefect markdown artifact with the counts, the predictions' spread and the
studies outside the model's training domain.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs import DomainPolicy, load_config
from flows.run_links import artifact_key
from flows.stages import with_io_retries
from tasks.champion import ServedModel, load_champion
from tasks.io import write_csv_atomic
from tasks.score import ScoreResult, score_files, study_files, summary_markdown


@task(name="load-champion", cache_policy=NO_CACHE)
def load_model(tracking_uri: str, model_name: str, variant: str, download_dir: Path) -> ServedModel:
    model = load_champion(tracking_uri, model_name, variant, download_dir)
    get_run_logger().info("scoring with %s v%s on %s", model.name, model.version, model.provider)
    return model


@task(name="score", cache_policy=NO_CACHE)
def score(files: list[Path], model: ServedModel, policy: DomainPolicy) -> ScoreResult:
    result = score_files(files, model, policy)
    counts = result.summary()
    if counts["discovered"] != counts["scored"] + counts["rejected"]:  # out_of_domain is among them
        raise RuntimeError(f"counts do not reconcile: {counts}")
    get_run_logger().info("scored: %s", counts)
    return result


@dataclass(frozen=True)
class ScoreSummary:
    scores_csv: Path
    rejects_csv: Path
    counts: dict[str, int]
    model: str


@flow(name="score-studies")
def score_studies(config_path: str, input_dir: str) -> ScoreSummary:
    """Score every file under `input_dir` with the champion named by the config's registry."""
    config = load_config(config_path, check_paths=False)
    out_dir = config.run_dir / "scores" / str(runtime.flow_run.id)
    files = study_files(Path(input_dir))
    with tempfile.TemporaryDirectory(prefix="medxfer-score-") as download_dir:
        model = with_io_retries(load_model, config.registry)(config.registry.tracking_uri, config.registry.model_name,
                                                             config.serve.variant, Path(download_dir))
        result = score(files, model, config.domain.policy)
    scores_csv = write_csv_atomic(result.scores, out_dir / "scores.csv")
    rejects_csv = write_csv_atomic(result.rejects, out_dir / "score_rejects.csv")
    create_markdown_artifact(key=artifact_key(config.name, "scores"),
                             markdown=summary_markdown(result, model), description="Batch scoring summary")
    return ScoreSummary(scores_csv, rejects_csv, result.summary(), f"{model.name} v{model.version}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Score a folder of new studies with the champion model")
    parser.add_argument("config", type=Path, help="pipeline YAML: its registry section names the model")
    parser.add_argument("input_dir", type=Path, help="folder of DICOM/PNG/JPEG files")
    args = parser.parse_args()
    summary = score_studies(str(args.config), str(args.input_dir))
    print(f"{summary.counts} with {summary.model}\nscores: {summary.scores_csv}\nrejects: {summary.rejects_csv}")


if __name__ == "__main__":
    main()
