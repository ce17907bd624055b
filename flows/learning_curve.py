"""How many images to label: a config trained on growing subsets of the training split, each
model evaluated on the test split, and an inverse power law fitted through the results.

Each (subset size, seed) model is a `curve-point` task run on the flow's task runner,
`learning_curve.parallel` at a time. The answer comes in words ("with 2x the labels, expect
AUC x [lo, hi]; the curve flattens at about N"), a plot, a table, an MLflow run and a Prefect
artifact; the README says how to read them and when not to extrapolate.

Run: python -m flows.learning_curve configs/breast_ultrasound.yaml
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from configs import PipelineConfig, load_config
from flows.parallel import in_flight, threads_per_run
from flows.pipeline import ingest, preprocess
from flows.run_links import artifact_key
from flows.stages import stage
from tasks.evaluate import compute_metrics, no_skill_outputs, predict, skill_metrics
from tasks.io import write_csv_atomic, write_text_atomic
from tasks.learning_curve import (CurvePoint, LearningCurve, curve_markdown, curve_sizes, extrapolation_note,
                                  learning_curve, nested_subsets, plot_curve)
from tasks.preprocess import PreparedData, SplitData
from tasks.register import tracking_run
from tasks.train import train_model
from tasks.tune import embedded_image


@task(name="curve-point", cache_policy=NO_CACHE, task_run_name="{size}-images-seed-{seed}")
def curve_point(config: PipelineConfig, train: SplitData, val: SplitData, test: SplitData, size: int, seed: int,
                patients: int) -> CurvePoint:
    """Train on one subset (model seed `config.seed + seed`) and evaluate on the test split."""
    result = train_model(config.model, config.train, config.task_spec, config.seed + seed, train, val,
                         tracking_uri=config.registry.tracking_uri)
    outputs = predict(result.model, test.images, config.train.batch_size, result.device)
    spec = config.task_spec
    metrics = compute_metrics(spec.kind, test.targets, outputs, spec.positive_index)
    no_skill = no_skill_outputs(spec.kind, train.targets, len(test), spec.num_outputs)
    metrics |= skill_metrics(spec.kind, test.targets, outputs, no_skill, spec.positive_index)
    get_run_logger().info("%d images (%d patients), seed %d, %s: %s", len(train), patients, seed,
                          result.strategy.value, {k: round(v, 4) for k, v in metrics.items()})
    seconds = sum(epoch.seconds for epoch in result.history) + result.feature_seconds
    return CurvePoint(size, seed, len(train), patients, result.strategy.value,
                      sum(epoch.head_l2 is None for epoch in result.history), seconds, metrics, outputs)


@dataclass(frozen=True)
class CurveSummary:
    answer: str
    plot: Path
    table: Path
    run_id: str


@stage(name="publish-learning-curve")
def publish_curve(config: PipelineConfig, curve: LearningCurve, out_dir: Path, run_id: str) -> CurveSummary:
    title = f"{config.name}: learning curve"
    plot = plot_curve(curve, out_dir / "learning_curve.png", title)
    table = write_csv_atomic(curve.table, out_dir / "learning_curve.csv")
    note = extrapolation_note(curve)
    write_text_atomic(out_dir / "learning_curve.md", curve_markdown(curve, title, f"{note}\n\nPlot: `{plot.name}`"))
    for path in (plot, table, out_dir / "learning_curve.md"):
        mlflow.log_artifact(str(path), "learning_curve")
    metric = curve.metric
    means = curve.table.groupby("size")[metric].mean()
    mlflow.log_metrics({f"{metric}_at_{size}": value for size, value in means.items()})
    mlflow.log_metrics({f"{metric}_now": curve.now[0], f"{metric}_doubled": curve.doubled[0],
                        f"{metric}_doubled_low": curve.doubled[1], f"{metric}_doubled_high": curve.doubled[2],
                        "flat_at_images": curve.flat[0], "flat_at_low": curve.flat[1], "flat_at_high": curve.flat[2],
                        "fit_a": curve.fit.a, "fit_b": curve.fit.b, "fit_c": curve.fit.c})
    mlflow.set_tag("answer", curve.answer())
    key = artifact_key(config.name)
    create_markdown_artifact(key=f"{key}-learning-curve", description="How many images to label",
                             markdown=curve_markdown(curve, title, f"{note}\n\n{embedded_image(plot, title)}"))
    create_table_artifact(key=f"{key}-learning-curve-points", description="Every model of the learning curve",
                          table=curve.table.to_dict(orient="records"))
    return CurveSummary(curve.answer(), plot, table, run_id)


@flow(name="learning-curve")
def learning_curve_flow(config_path: str) -> CurveSummary:
    """Nested, stratified, patient-disjoint subsets x seeds; test metrics; an inverse power law fit."""
    config = load_config(config_path)
    settings = config.learning_curve
    with threads_per_run(settings.parallel), tracking_run(config, run_name=f"{config.name}-learning-curve") as run_id:
        run_dir = config.run_dir / run_id
        prepared: PreparedData = preprocess(config, ingest(config, run_dir), run_dir)
        train_rows = np.flatnonzero(prepared.manifest["split"].to_numpy() == "train")
        patients = prepared.manifest["patient_key"].to_numpy()[train_rows]
        train, val, test = (prepared.split(name) for name in ("train", "val", "test"))
        sizes = curve_sizes(settings, len(train))
        jobs = []
        for seed in range(settings.seeds):
            subsets = nested_subsets(patients, train.targets, config.task_spec.kind, sizes, config.seed + seed)
            jobs += [(size, seed, rows) for size, rows in subsets.items()]
        mlflow.log_params({"curve_sizes": sizes, "curve_seeds": settings.seeds})
        pending = iter(jobs)

        def submit_next(_running: int) -> PrefectFuture | None:
            job = next(pending, None)
            if job is None:
                return None
            size, seed, rows = job
            return curve_point.submit(config, SplitData(train.images[rows], train.targets[rows]), val, test,
                                      size, seed, len(set(patients[rows])))

        points = [done.result() for done in in_flight(submit_next, settings.parallel)]
        curve = learning_curve(sorted(points, key=lambda p: (p.size, p.seed)), config.task_spec, test.targets,
                               settings, config.seed, config.evaluate.confidence)
        summary = publish_curve(config, curve, run_dir, run_id)
    get_run_logger().info("learning curve: %s", summary.answer)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="How many labelled images a medxfer config needs")
    parser.add_argument("config", type=Path, help="YAML config, e.g. the best config a tuning run wrote")
    summary = learning_curve_flow(str(parser.parse_args().config))
    print(f"{summary.answer}\nplot: {summary.plot}\ntable: {summary.table}")


if __name__ == "__main__":
    main()
