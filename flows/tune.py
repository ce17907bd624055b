"""Tune hyperparameters: an Optuna search whose trials are Prefect tasks, then the best config
trained, evaluated and registered by the training pipeline.

Each trial is a `tune-trial` task run submitted to the flow's task runner, `tune.parallel_trials`
at a time; it trains on the training split, reports the validation metric each epoch so the
pruner can stop it, and is logged as an MLflow run nested under the search's run. The study
is kept in `tune.storage` (SQLite under output_dir by default), so running the same config
again resumes it. The test split is never read here: the best trial's settings are written
out as a config file, and `flows.pipeline` (run at the end when `tune.train_best`) trains
it once more, evaluates it on the test split once, and registers it.

Run: python -m flows.tune configs/breast_ultrasound.yaml
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from configs import RESOLUTION, PipelineConfig, SamplerKind, load_config
from flows.parallel import in_flight, threads_per_run
from flows.pipeline import PipelineSummary, train_pipeline
from flows.run_links import artifact_key
from flows.stages import stage
from tasks.ingest import ingest_dataset
from tasks.io import write_csv_atomic, write_text_atomic
from tasks.preprocess import preprocess_dataset
from tasks.register import tracking_run
from tasks.tune import (FINISHED, StudyRef, ask, TrialData, TrialOutcome, fail_stale_trials, finished_trials, importances,
                        report_markdown, run_trial, save_plots, search_cost, suggest, trials_frame, write_best_config)

TUNED_SPLITS = ("train", "val")  # the test split is left to the pipeline's one evaluation


@stage(name="load-tuning-data")
def load_tuning_data(config: PipelineConfig) -> TrialData:
    """The training and validation images at every resolution the search may pick (test: not read)."""
    logger = get_run_logger()
    ingested = ingest_dataset(config.data, config.seed, config.patient_salt())
    manifest = ingested.manifest[ingested.manifest["split"].isin(TUNED_SPLITS)]
    crops = config.tune.space[RESOLUTION].choices if RESOLUTION in config.tune.space else [config.preprocess.crop]
    data = {}
    for crop in crops:
        settings = config.with_params({RESOLUTION: crop}).preprocess
        prepared = preprocess_dataset(manifest, config.data.root, settings)
        data[settings.crop] = (prepared.split("train"), prepared.split("val"))
        logger.info("tuning data at %d px: %d train, %d val images (%d rejected)", settings.crop,
                    len(data[settings.crop][0]), len(data[settings.crop][1]), len(prepared.rejects))
    mlflow.log_metrics({"tune_train_images": len(next(iter(data.values()))[0]),
                        "tune_val_images": len(next(iter(data.values()))[1])})
    return data


@task(name="tune-trial", cache_policy=NO_CACHE, task_run_name="trial-{number}")
def tune_trial(ref: StudyRef, number: int, trial_id: int, config: PipelineConfig, params: dict, data: TrialData,
               parent_run_id: str, work_dir: Path, deadline: float | None) -> TrialOutcome:
    outcome = run_trial(ref, trial_id, config, params, data, parent_run_id, work_dir, deadline)
    get_run_logger().info("trial %d %s: value %s (%s)", number, outcome.state.lower(), outcome.value, outcome.note)
    return outcome


@dataclass(frozen=True)
class TuneSummary:
    study: str
    storage: str  # without its password
    best_trial: int
    best_value: float
    best_params: dict
    best_config: Path
    trials: dict[str, int]  # by state
    pipeline: PipelineSummary | None  # the best config trained and registered (tune.train_best)


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _room_for_another(study: optuna.Study, config: PipelineConfig, in_flight: int, deadline: float | None) -> bool:
    if deadline is not None and time.time() >= deadline:
        return False
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
        return False
    return len(finished_trials(study)) + in_flight < config.tune.trials


@stage(name="publish-study")
def publish_study(config_path: str, config: PipelineConfig, ref: StudyRef, study: optuna.Study,
                  work_dir: Path) -> Path:
    """The trials table, importances, plots and best trial (MLflow and Prefect); returns the best config's path."""
    best_config = write_best_config(Path(config_path), config, ref, study, work_dir)
    importance = importances(study, config.seed)
    plots = save_plots(study, work_dir / "plots", importance)
    cost = search_cost(study, config)
    trials = trials_frame(study)
    write_csv_atomic(trials, work_dir / "trials.csv")
    report = report_markdown(config, ref, study, best_config, importance, cost, plots, inline_plots=False)
    write_text_atomic(work_dir / "best_trial.md", report)
    for path in (best_config, work_dir / "trials.csv", work_dir / "best_trial.md"):
        mlflow.log_artifact(str(path), "tune")
    for plot in plots:
        mlflow.log_artifact(str(plot), "tune/plots")
    best = study.best_trial
    mlflow.log_metrics({"best_value": best.value, "best_trial": best.number, "trained_epochs": cost.epochs,
                        "trained_images": cost.images, "trial_seconds": cost.seconds,
                        "pruning_saved_fraction": cost.saved_fraction,
                        **{f"importance_{key}": value for key, value in importance.items()}})
    mlflow.log_params({f"best.{key}": value for key, value in best.params.items()})
    key = artifact_key(config.name)
    create_markdown_artifact(key=f"{key}-tune", description=f"Hyperparameter search {ref.name}: best trial",
                             markdown=report_markdown(config, ref, study, best_config, importance, cost, plots,
                                                      inline_plots=True))
    create_table_artifact(key=f"{key}-tune-trials", description=f"Every trial of {ref.name}",
                          table=trials.astype(object).where(trials.notna(), None).to_dict(orient="records"))
    return best_config


@flow(name="tune-hyperparameters")
def tune_hyperparameters(config_path: str) -> TuneSummary:
    """Search `tune.space` on the validation split, write the best config, then train and register it."""
    logger = get_run_logger()
    config = load_config(config_path)
    tune = config.tune
    ref = StudyRef.for_config(config)
    storage = ref.storage()
    study = ref.open(tune, config.seed, storage)
    work_dir = config.run_dir / "tune" / ref.name
    deadline = time.time() + 60 * tune.timeout_minutes if tune.timeout_minutes else None
    logger.info("study %s in %s: %d finished trials so far, %d wanted", ref.name, ref.redacted_url,
                len(finished_trials(study)), tune.trials)
    with threads_per_run(tune.parallel_trials), tracking_run(config, run_name=f"{config.name}-tune") as run_id:
        mlflow.set_tags({"optuna_study": ref.name, "optuna_storage": ref.redacted_url,
                         "sampler": tune.sampler.value, "pruner": tune.pruner.value})
        data = load_tuning_data(config)
        progress = create_progress_artifact(0.0, key=f"{artifact_key(config.name)}-tune-progress",
                                            description=f"Finished trials of {ref.name} out of {tune.trials}")

        def submit_next(running: int) -> PrefectFuture | None:
            fail_stale_trials(study)  # a killed run's trials: failed, then queued again with their settings
            if not _room_for_another(study, config, running, deadline):
                return None
            trial = ask(study)
            params = suggest(trial, tune.space)
            # A first heartbeat now: if this run is killed before the trial starts, it still goes stale.
            storage.record_heartbeat(trial._trial_id)
            return tune_trial.submit(ref, trial.number, trial._trial_id, config.with_params(params), params, data,
                                     run_id, work_dir, deadline)

        failures = 0
        for done in in_flight(submit_next, tune.parallel_trials):
            outcome = done.result()
            failures += outcome.state == "FAIL"
            if failures >= 3 and not _completed(study):
                raise RuntimeError(f"{failures} trials failed and none completed; the last: {outcome.note}")
            update_progress_artifact(progress, min(100.0, 100.0 * len(finished_trials(study)) / tune.trials))
        if not _completed(study):
            raise RuntimeError(f"study {ref.name}: no trial completed (see the trials' logs)")
        best_config = publish_study(config_path, config, ref, study, work_dir)
    best = study.best_trial
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (*FINISHED, optuna.trial.TrialState.FAIL)}
    logger.info("best trial %d: validation %.4f with %s; config %s", best.number, best.value, best.params, best_config)
    # After the search's MLflow run has ended: the pipeline opens its own run.
    pipeline = train_pipeline(str(best_config)) if tune.train_best else None
    return TuneSummary(ref.name, ref.redacted_url, best.number, best.value, best.params, best_config, counts, pipeline)


def main() -> None:
    parser = argparse.ArgumentParser(description="Tune a medxfer config's hyperparameters (Optuna, Prefect)")
    parser.add_argument("config", type=Path, help="YAML config with a tune section, e.g. configs/breast_ultrasound.yaml")
    summary = tune_hyperparameters(str(parser.parse_args().config))
    print(f"best trial {summary.best_trial}: validation {summary.best_value:.4f}\nconfig: {summary.best_config}")
    if summary.pipeline:
        print(summary.pipeline.text())


if __name__ == "__main__":
    main()
