"""Hyperparameter search, the parts flows/tune.py wraps: the study, one trial, and the reports.

Optuna samples each trial's settings from `tune.space` (TPE, or every grid point) and
prunes a trial whose validation metric, reported after each epoch, falls behind
(median or successive halving). The study lives in a database (`tune.storage`) with
heartbeats, so a search that was killed resumes: its finished trials count, and a
trial that was running is retried with the same settings, from its last epoch
checkpoint. A trial is self-contained (it opens the study from the database by
name), so it can run on any Prefect task runner. Trials read the training and validation
splits only.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from configs import PipelineConfig, PrunerKind, SamplerKind, SearchParam, TuneConfig, apply_params
from tasks.evaluate import primary_metric, save_figure
from tasks.io import atomic_path, write_text_atomic
from tasks.preprocess import SplitData
from tasks.train import EpochResult, train_model

log = logging.getLogger(__name__)

# Finished trials: what `tune.trials` counts (as Optuna's MaxTrialsCallback does).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 30  # a running trial without a heartbeat for twice this long is retried
BEST_CONFIG_FILE = "best_config.yaml"
# What a trial records about its cost (user attributes), so a study can be costed from the database alone.
COST_ATTRS = ("epochs", "train_images", "feature_images", "seconds")

TrialData = dict[int, tuple[SplitData, SplitData]]  # crop size -> (train, val)


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: all any process needs to open it."""

    storage_url: str
    name: str
    direction: str  # "maximize" or "minimize"

    @classmethod
    def for_config(cls, config: PipelineConfig) -> "StudyRef":
        tune_dir = config.run_dir / "tune"
        url = config.tune.storage or f"sqlite:///{(tune_dir / 'optuna.db').resolve()}"
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        higher_is_better = primary_metric(config.task_spec.kind)[1]
        return cls(url, config.tune.study_name or f"{config.name}-tune", "maximize" if higher_is_better else "minimize")

    @property
    def redacted_url(self) -> str:
        """The storage URL without its password, for logs and MLflow."""
        return make_url(self.storage_url).render_as_string(hide_password=True)

    def storage(self) -> RDBStorage:
        # SQLite: wait for the lock instead of failing when parallel trials write at once.
        engine = {"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return RDBStorage(self.storage_url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                              grace_period=2 * HEARTBEAT_SECONDS,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                  max_retry=3, inherit_intermediate_values=True))

    def open(self, tune: TuneConfig, seed: int, storage: RDBStorage | None = None) -> optuna.Study:
        """The study, created on first use; the same one (with its trials) on every later call."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.create_study(storage=storage or self.storage(), study_name=self.name, direction=self.direction,
                                       sampler=make_sampler(tune, seed), pruner=make_pruner(tune),
                                       load_if_exists=True)


def make_sampler(tune: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if tune.sampler is SamplerKind.GRID:
        return optuna.samplers.GridSampler(grid_space(tune.space), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: trials running in parallel count as bad guesses, so they are not all sent
        # to the same region of the space.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials, multivariate=True,
                                          constant_liar=True)


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner is PrunerKind.MEDIAN:
        return optuna.pruners.MedianPruner(n_startup_trials=max(tune.parallel_trials, 2),
                                           n_warmup_steps=tune.warmup_epochs)
    if tune.pruner is PrunerKind.SUCCESSIVE_HALVING:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(tune.warmup_epochs, 1))
    return optuna.pruners.NopPruner()


def grid_space(space: dict[str, SearchParam]) -> dict[str, list]:
    return {key: param.values() for key, param in space.items()}


def grid_size(space: dict[str, SearchParam]) -> int:
    return int(np.prod([len(values) for values in grid_space(space).values()]))


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> dict:
    """The trial's value for every search key (fixed ones, e.g. a retried trial's, come back as they were)."""
    params = {}
    for key, param in space.items():
        if param.choices is not None:
            params[key] = trial.suggest_categorical(key, param.choices)
        elif param.integer:
            params[key] = trial.suggest_int(key, param.low, param.high, step=int(param.step or 1), log=param.log)
        else:
            params[key] = trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)
    return params


def ask(study: optuna.Study) -> optuna.Trial:
    """The next trial: a queued one (e.g. a retry) first, else a new sample."""
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; trials as tasks record their own.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail running trials whose heartbeat stopped (a killed run's); the storage queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@dataclass
class DiskFeatureStore:
    """Frozen-backbone features on disk, one file per key (tasks.train.FeatureStore).

    Shared by trials in threads (one lock per key, so one pass), by processes that see
    the folder, and by a resumed search. Writes are atomic. Counts the images this
    instance had to run through the backbone.
    """

    folder: Path
    computed_images: int = 0

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        path = self.folder / f"features-{key[:32]}.pt"
        with _key_lock(str(path)):
            if path.exists():
                return torch.load(path, weights_only=True)
            features = compute()
            with atomic_path(path) as tmp:
                torch.save(features, tmp)
            self.computed_images += len(features)
            return features


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat until the block ends, so a killed run's trials can be told apart."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class TrialRun:
    """A trial's MLflow run, nested under the search's run (the `mlflow.parentRunId` tag MLflow's
    own nesting uses), written through the client so it works from any thread or process."""

    def __init__(self, tracking_uri: str, parent_run_id: str, number: int, params: dict):
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_run(parent_run_id).info.experiment_id
        self.run_id = self.client.create_run(experiment, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": parent_run_id, "optuna_trial": str(number)}).info.run_id
        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_epoch(self, epoch: EpochResult) -> None:
        for key in ("val_metric", "train_loss", "images_per_second"):
            self.client.log_metric(self.run_id, key, getattr(epoch, key), step=epoch.epoch)

    def end(self, state: TrialState, value: float | None, note: str, cost: dict) -> None:
        self.client.set_tag(self.run_id, "optuna_state", state.name)
        if note:
            self.client.set_tag(self.run_id, "optuna_note", note)
        for key, amount in cost.items():
            self.client.log_metric(self.run_id, key, amount)
        if value is not None:
            self.client.log_metric(self.run_id, "value", value)
        status = {TrialState.COMPLETE: RunStatus.FINISHED, TrialState.PRUNED: RunStatus.KILLED}.get(state, RunStatus.FAILED)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None  # best validation metric (a pruned trial: its last one)
    note: str  # why it was pruned or failed


class BudgetSpent(optuna.TrialPruned):
    """The search's time budget ran out during this trial."""


def checkpoint_folder(root: Path, trial: optuna.trial.FrozenTrial) -> Path:
    """One folder per trial, which a retry of it shares (so it resumes from its checkpoint). Not one per
    set of settings: TPE may run the same settings twice at once, and one must not delete the other's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return root / f"trial-{trial.number if retried is None else retried}"


def completed_twin(study: optuna.Study, params: dict) -> optuna.trial.FrozenTrial | None:
    """The first completed trial with exactly these settings, if any. TPE samples a discrete
    space's favourite points again and again, and a seeded training would only repeat its value."""
    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.params == params),
                None)


def run_trial(ref: StudyRef, trial_id: int, config: PipelineConfig, params: dict, data: TrialData,
              parent_run_id: str, work_dir: Path, deadline: float | None) -> TrialOutcome:
    """Train one trial's config, reporting the validation metric each epoch; tell the study how it ended.

    The trial is pruned when the pruner says so, or stopped when wall-clock `deadline`
    (seconds since the epoch) has passed; an error fails this trial only. Settings that an
    earlier trial completed are not trained again: the trial takes that trial's value.
    """
    storage = ref.storage()
    study = optuna.load_study(study_name=ref.name, storage=storage, pruner=make_pruner(config.tune))
    trial = optuna.Trial(study, trial_id)
    train, val = data[config.preprocess.crop]
    run = TrialRun(config.registry.tracking_uri, parent_run_id, trial.number, params)
    cost = {"epochs": 0, "train_images": 0, "feature_images": 0, "seconds": 0.0}
    started = time.perf_counter()
    epoch_ended = [time.time()]

    def after_epoch(epoch: EpochResult) -> None:
        run.log_epoch(epoch)
        if epoch.head_l2 is not None:  # a `head` fit: no epochs to prune between
            return
        cost["epochs"] += 1
        cost["train_images"] += len(train)
        trial.report(epoch.val_metric, epoch.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch.epoch} (val {epoch.val_metric:.4f})")
        now, epoch_seconds = time.time(), time.time() - epoch_ended[0]
        epoch_ended[0] = now
        if deadline is not None and now + epoch_seconds > deadline:  # another epoch would overrun it
            raise BudgetSpent(f"time budget spent after epoch {epoch.epoch}")

    checkpoints = checkpoint_folder(work_dir / "checkpoints", storage.get_trial(trial_id))
    features = DiskFeatureStore(work_dir / "features")
    state, value, note = TrialState.FAIL, None, ""
    with heartbeat(storage, trial_id):
        try:
            if (twin := completed_twin(study, params)) is not None:
                state, value = TrialState.COMPLETE, twin.value
                note = f"same settings as trial {twin.number}: its value, not trained again"
            else:
                result = train_model(config.model, config.train, config.task_spec, config.seed, train, val,
                                     tracking_uri=config.registry.tracking_uri, on_epoch_end=after_epoch,
                                     checkpoint_dir=checkpoints, feature_store=features)
                state, value = TrialState.COMPLETE, result.best_metric
                note = f"{result.strategy.value}, best epoch {result.best_epoch}"
        except optuna.TrialPruned as exc:  # told without a value: Optuna keeps its last reported one
            state, note = TrialState.PRUNED, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad trial must not end the search
            note = f"{type(exc).__name__}: {exc}"
            log.exception("trial %d failed", trial.number)
        finally:
            cost["seconds"], cost["feature_images"] = time.perf_counter() - started, features.computed_images
            for key, amount in {**cost, "note": note, "mlflow_run_id": run.run_id}.items():
                trial.set_user_attr(key, amount)
        frozen = study.tell(trial, value, state=state, skip_if_finished=True)
    if checkpoints.exists():
        for leftover in checkpoints.glob("*"):
            leftover.unlink()
        checkpoints.rmdir()
    run.end(state, frozen.value, note, cost)
    return TrialOutcome(trial.number, state.name, frozen.value, note)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, the search params, and what it cost."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value,
                     **{f"param {key}": value for key, value in trial.params.items()},
                     **{key: trial.user_attrs.get(key, 0) for key in COST_ATTRS},
                     "note": trial.user_attrs.get("note", "")})
    return pd.DataFrame(rows)


def importances(study: optuna.Study, seed: int) -> dict[str, float]:
    """fANOVA importance of each search key over the completed trials (empty with too few of them)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as exc:  # e.g. every completed trial had the same settings
        log.info("no parameter importances: %s", exc)
        return {}


@dataclass(frozen=True)
class SearchCost:
    """What the study's trials trained, and (at most) what the same trials would have trained unpruned."""

    epochs: int
    images: int  # training images through forward + backward, plus head feature passes
    seconds: float
    unpruned_epochs: int  # a pruned trial counted at its full train.epochs (early stopping might end it sooner)

    @property
    def saved_fraction(self) -> float:
        return 1 - self.epochs / self.unpruned_epochs if self.unpruned_epochs else 0.0


def search_cost(study: optuna.Study, base: PipelineConfig) -> SearchCost:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL))
    epochs = sum(t.user_attrs.get("epochs", 0) for t in trials)
    unpruned = sum(base.with_params(t.params).train.epochs if t.state is TrialState.PRUNED
                   else t.user_attrs.get("epochs", 0) for t in trials)
    images = sum(t.user_attrs.get("train_images", 0) + t.user_attrs.get("feature_images", 0) for t in trials)
    return SearchCost(int(epochs), int(images), float(sum(t.user_attrs.get("seconds", 0.0) for t in trials)),
                      int(unpruned))


def save_plots(study: optuna.Study, folder: Path, importance: dict[str, float]) -> list[Path]:
    """The optimisation history, each trial's validation metric by epoch, and the importances, as PNGs."""
    from optuna.visualization import matplotlib as optuna_plots

    plots = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in (("history", optuna_plots.plot_optimization_history),
                           ("epochs", optuna_plots.plot_intermediate_values)):
            try:
                axes = draw(study)
            except ValueError as exc:  # nothing to draw yet (e.g. no intermediate values)
                log.info("no %s plot: %s", name, exc)
                continue
            plots.append(save_figure(axes.figure, folder / f"tune_{name}.png"))
    if importance:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(importance) + 1))
        keys = list(importance)[::-1]
        ax.barh(keys, [importance[k] for k in keys])
        ax.set_xlabel("fANOVA importance (share of the validation metric's variance)")
        ax.set_title("Which settings mattered")
        plots.append(save_figure(fig, folder / "tune_importances.png"))
    return plots


def embedded_image(path: Path, title: str) -> str:
    """A markdown image whose data is inline, so a Prefect artifact can show it."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def report_markdown(config: PipelineConfig, ref: StudyRef, study: optuna.Study, best_config: Path,
                    importance: dict[str, float], cost: SearchCost, plots: list[Path], inline_plots: bool) -> str:
    """The search in words and tables: the best trial, its config file, what mattered, what it cost."""
    metric = primary_metric(config.task_spec.kind)[0]
    counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts().to_dict()
    best = study.best_trial
    lines = [f"# Hyperparameter search: {ref.name}", "",
             f"Best trial **{best.number}**: validation {metric} **{best.value:.4f}** "
             f"(selection used the validation split only; the test split was not read).", "",
             f"Config to train and register: `{best_config}` (`python -m flows.pipeline {best_config}`).", "",
             "| setting | best value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in best.params.items()]
    lines += ["", f"Trials: {', '.join(f'{n} {state.lower()}' for state, n in sorted(counts.items()))}. "
              f"Trained {cost.epochs} epochs ({cost.images:,} images, {cost.seconds / 60:.1f} trial-minutes); "
              f"unpruned, the same trials would have run {cost.unpruned_epochs} epochs "
              f"(pruning saved {cost.saved_fraction:.0%}).", "",
              f"Study `{ref.name}` in `{ref.redacted_url}` (a rerun with the same config resumes it)."]
    if importance:
        lines += ["", "| setting | importance |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in importance.items()]
    for plot in plots:
        lines += ["", embedded_image(plot, plot.stem) if inline_plots else f"Plot: `plots/{plot.name}`"]
    return "\n".join(lines)


def best_config_text(raw: dict, params: dict, header: list[str]) -> str:
    """The site's config (as its YAML file had it) with the best trial's settings, as YAML."""
    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(apply_params(raw, params), sort_keys=False)


def write_best_config(config_path: Path, config: PipelineConfig, ref: StudyRef, study: optuna.Study,
                      folder: Path) -> Path:
    best = study.best_trial
    metric = primary_metric(config.task_spec.kind)[0]
    header = [f"Written by flows/tune.py from {config_path}: study {ref.name}, trial {best.number},",
              f"validation {metric} {best.value:.4f} (the test split was not used to choose it).",
              f"Train, evaluate and register it: python -m flows.pipeline {folder / BEST_CONFIG_FILE}"]
    raw = yaml.safe_load(Path(config_path).read_text())
    return write_text_atomic(folder / BEST_CONFIG_FILE, best_config_text(raw, best.params, header))
