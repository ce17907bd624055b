"""The tuning flow for real (Prefect test server, MLflow and Optuna on SQLite) on the small real
BreastMNIST subset at 32 and 48 px: trials as parallel task runs, nested MLflow runs, one feature
pass for `head` trials, no test image read, a killed search resumed from its trial's checkpoint,
and the best config trained and registered by the pipeline."""

import json
import time

import optuna
import pytest
import yaml
from mlflow import MlflowClient

import flows.tune
import tasks.tune
from configs import ConfigError, load_config
from flows.tune import tune_hyperparameters
from tasks.ingest import ingest_dataset
from tasks.preprocess import preprocess_dataset
from tasks.train import train_model
from tasks.tune import StudyRef, ask, checkpoint_folder, grid_size, suggest
from tests.conftest import write_config
from tests.test_pipeline import _all_prefect_logs, _run_artifacts
from tests.test_training import Interrupted, backbone_file  # noqa: F401  (module fixture: a source model)

SPACE = {"train.lr": {"low": 3e-4, "high": 3e-3, "log": True}, "train.epochs": {"choices": [1, 2]},
         "model.freeze": {"choices": ["head", "full"]}, "resolution": {"choices": [32, 48]}}


def tune_config(tmp_path, data_dir, backbone, **tune):
    return write_config(tmp_path, data_dir, model={"weights": str(backbone), "freeze": "full"},
                        train={"batch_size": 16, "patience": 2}, evaluate={"gradcam_images": 2},
                        export={"int8": False, "fp16": False},
                        tune={"space": SPACE, "trials": 4, "parallel_trials": 2, "startup_trials": 2,
                              "warmup_epochs": 0, "timeout_minutes": 15, **tune})


def test_search_space_is_checked_when_the_config_loads(tmp_path, breast_dicom_dir, backbone_file):
    for space, message in [({"train.lrr": {"low": 1e-4, "high": 1e-3}}, r"tune\.space\.train\.lrr: .* unknown"),
                           ({"data.task": {"choices": ["regression"]}}, "searchable keys are"),
                           ({"model.freeze": {"choices": ["most"]}}, "model.freeze: 'most' does not fit"),
                           ({"train.lr": {"low": 1e-3}}, "give either low and high, or choices"),
                           ({"resolution": {"low": 32, "high": 64}}, "resolution: a list of choices")]:
        with pytest.raises(ConfigError, match=message):
            load_config(tune_config(tmp_path, breast_dicom_dir, backbone_file, space=space))
    with pytest.raises(ConfigError, match="a grid needs choices"):
        load_config(tune_config(tmp_path, breast_dicom_dir, backbone_file, sampler="grid",
                                space={"train.lr": {"low": 1e-4, "high": 1e-3}}))
    config = load_config(tune_config(tmp_path, breast_dicom_dir, backbone_file))
    trial = config.with_params({"resolution": 48, "augment_strength": 0.5, "train.lr": 1e-3})
    assert (trial.preprocess.resize, trial.preprocess.crop) == (55, 48) and trial.train.lr == 1e-3
    assert trial.train.augment.enabled and trial.train.augment.rotation_degrees == 10.0
    assert not config.with_params({"augment_strength": 0.0}).train.augment.enabled
    assert grid_size(config.tune.space | {"train.lr": config.tune.space["train.epochs"]}) == 16


def _enqueue(config, trials: list[dict]) -> None:
    study = StudyRef.for_config(config).open(config.tune, config.seed)
    for params in trials:
        study.enqueue_trial(params)


def test_tuning_flow_runs_parallel_trials_then_trains_and_registers_the_best_config(
        prefect_server, tmp_path, breast_dicom_dir, backbone_file, monkeypatch):
    path = tune_config(tmp_path, breast_dicom_dir, backbone_file)
    config = load_config(path)
    # Two `head` trials at one resolution (they share one feature pass), then two that train.
    _enqueue(config, [{"train.lr": 1e-3, "train.epochs": 1, "model.freeze": "head", "resolution": 32},
                      {"train.lr": 2e-3, "train.epochs": 2, "model.freeze": "head", "resolution": 32},
                      {"train.lr": 1e-3, "train.epochs": 2, "model.freeze": "full", "resolution": 48},
                      {"train.lr": 3e-4, "train.epochs": 2, "model.freeze": "full", "resolution": 32}])
    decoded_splits = set()
    preprocess = flows.tune.preprocess_dataset

    def spy(manifest, *args, **kwargs):
        decoded_splits.update(manifest["split"])
        return preprocess(manifest, *args, **kwargs)

    monkeypatch.setattr(flows.tune, "preprocess_dataset", spy)
    state = tune_hyperparameters(str(path), return_state=True)
    summary = state.result()

    assert decoded_splits == {"train", "val"}  # the search never decoded a test image
    assert summary.trials["COMPLETE"] + summary.trials["PRUNED"] == 4 and summary.trials["FAIL"] == 0
    study = optuna.load_study(study_name=summary.study, storage=StudyRef.for_config(config).storage_url)
    trials = study.get_trials()
    head = [t for t in trials if t.params["model.freeze"] == "head"]
    # One backbone pass over the 40 train and the 40 val images between the two (running side by side).
    assert sum(t.user_attrs["feature_images"] for t in head) == 80
    assert len(list((config.run_dir / "tune" / summary.study / "features").glob("*.pt"))) == 2
    assert all(t.user_attrs["epochs"] == 0 for t in head)
    trained = [t for t in trials if t.params["model.freeze"] == "full"]
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] > 0 for t in trained)

    # The best trial's settings, written out as a config the pipeline then trained and registered.
    best = load_config(summary.best_config)
    assert summary.best_value == max(t.value for t in trials if t.state.name == "COMPLETE")
    assert best.preprocess.crop == summary.best_params["resolution"]
    assert best.model.freeze.value == summary.best_params["model.freeze"]
    assert best.train.lr == pytest.approx(summary.best_params["train.lr"])
    assert "validation roc_auc" in summary.best_config.read_text().splitlines()[1]
    assert summary.pipeline.registration.version == "1"
    client = MlflowClient(config.registry.tracking_uri)
    trained_run = client.get_run(summary.pipeline.registration.run_id)
    assert float(trained_run.data.params["train.lr"]) == pytest.approx(best.train.lr)
    assert trained_run.data.params["preprocess.crop"] == str(best.preprocess.crop)
    assert "test_roc_auc" in trained_run.data.metrics

    # MLflow: the search's run, every trial a run nested under it; no test metric anywhere in the search.
    experiment = client.get_experiment_by_name(config.registry.experiment).experiment_id
    (search,) = client.search_runs([experiment], f"tags.optuna_study = '{summary.study}'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{search.info.run_id}'")
    assert sorted(int(run.data.tags["optuna_trial"]) for run in children) == [t.number for t in trials]
    assert all(not any(key.startswith("test_") for key in run.data.metrics) for run in [search, *children])
    assert {"tune/best_config.yaml", "tune/trials.csv", "tune/best_trial.md", "tune/plots"} <= {
        a.path for a in client.list_artifacts(search.info.run_id, "tune")}
    assert search.data.metrics["best_value"] == summary.best_value

    # Prefect: each trial ran as its own task run of this flow run (its log lines say so), two at once.
    flow_run = state.state_details.flow_run_id
    trial_logs = {log.message.split()[1]: log for log in _all_prefect_logs()
                  if log.flow_run_id == flow_run and log.message.startswith("trial ")}
    assert sorted(trial_logs) == sorted(str(t.number) for t in trials)
    assert len({log.task_run_id for log in trial_logs.values()} - {None}) == 4
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    artifacts = _run_artifacts(state)
    report = artifacts["breast-ultrasound-tune"].data
    assert f"Best trial **{summary.best_trial}**" in report and "data:image/png;base64," in report
    assert len(json.loads(artifacts["breast-ultrasound-tune-trials"].data)) == 4


def test_a_killed_search_resumes_and_retries_its_running_trial_from_its_checkpoint(
        prefect_server, tmp_path, breast_dicom_dir, backbone_file, monkeypatch):
    monkeypatch.setattr(tasks.tune, "HEARTBEAT_SECONDS", 1)  # stale after 2 s instead of a minute
    space = {**SPACE, "model.freeze": {"choices": ["full"]}, "train.epochs": {"choices": [2]},
             "resolution": {"choices": [32]}}
    path = tune_config(tmp_path, breast_dicom_dir, backbone_file, trials=2, parallel_trials=1, train_best=False,
                       space=space)
    assert sum(tune_hyperparameters(str(path)).trials.values()) == 2

    # A third trial that was running when its flow run was killed: one epoch checkpointed, then silence.
    config = load_config(path)
    ref = StudyRef.for_config(config)
    killed = ask(ref.open(config.tune, config.seed))
    params = suggest(killed, config.tune.space)
    ref.storage().record_heartbeat(killed._trial_id)
    trial_config = config.with_params(params)
    ingested = ingest_dataset(trial_config.data, trial_config.seed, trial_config.patient_salt())
    prepared = preprocess_dataset(ingested.manifest, trial_config.data.root, trial_config.preprocess)
    checkpoints = checkpoint_folder(config.run_dir / "tune" / ref.name / "checkpoints",
                                    ref.storage().get_trial(killed._trial_id))

    def killed_after_first_epoch(epoch):
        if epoch.epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_model(trial_config.model, trial_config.train, trial_config.task_spec, trial_config.seed,
                    prepared.split("train"), prepared.split("val"), on_epoch_end=killed_after_first_epoch,
                    checkpoint_dir=checkpoints)
    time.sleep(3)

    raw = yaml.safe_load(path.read_text())
    raw["tune"]["trials"] = 3
    path.write_text(yaml.safe_dump(raw))
    resumed = tune_hyperparameters(str(path))
    trials = optuna.load_study(study_name=ref.name, storage=ref.storage_url).get_trials()
    assert trials[killed.number].state.name == "FAIL"  # failed once its heartbeat went stale
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == params and retry.state.name == "COMPLETE"
    assert retry.user_attrs["epochs"] == 1  # resumed after the checkpointed epoch: one of two left
    assert resumed.trials == {"COMPLETE": 3, "PRUNED": 0, "FAIL": 1}
    assert not checkpoints.exists()


def test_trials_with_the_same_settings_checkpoint_apart_and_a_retry_shares_its_trials_folder(tmp_path):
    # TPE may run the same settings twice at once: when one ends it deletes its folder, which must
    # not be the other's. A retry (heartbeat gone stale) resumes from the checkpoint of the trial it retries.
    study = optuna.create_study()
    lr = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for _ in range(2):
        study.enqueue_trial({"train.lr": 1e-3})
    first, twin = study.ask(lr), study.ask(lr)
    assert first.params == twin.params
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[first.number])
    retry = study.ask(lr)
    study.tell(retry, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[retry.number])
    retry_of_retry = study.ask(lr)

    root = tmp_path / "checkpoints"
    folder = {trial.number: checkpoint_folder(root, study.trials[trial.number])
              for trial in (first, twin, retry, retry_of_retry)}
    assert folder[first.number] != folder[twin.number]
    assert folder[retry.number] == folder[retry_of_retry.number] == folder[first.number]
    assert len({first.number, twin.number, retry.number, retry_of_retry.number}) == 4


def test_a_trial_behind_the_median_is_pruned_after_its_epoch(tmp_path, breast_dicom_dir, backbone_file):
    config = load_config(tune_config(tmp_path, breast_dicom_dir, backbone_file, warmup_epochs=0))
    ref = StudyRef.for_config(config)
    study = ref.open(config.tune, config.seed)
    distributions = {"train.epochs": optuna.distributions.CategoricalDistribution([1, 2])}
    for _ in range(2):  # two finished trials whose validation AUC no real one can reach
        study.add_trial(optuna.trial.create_trial(params={"train.epochs": 2}, distributions=distributions,
                                                  value=2.0, intermediate_values={1: 2.0, 2: 2.0}))
    trial = study.ask(distributions)
    params = {"train.epochs": 2, "resolution": 32, "model.freeze": "full"}
    trial_config = config.with_params(params)
    ingested = ingest_dataset(trial_config.data, trial_config.seed, trial_config.patient_salt())
    prepared = preprocess_dataset(ingested.manifest, trial_config.data.root, trial_config.preprocess)
    client = MlflowClient(config.registry.tracking_uri)
    parent = client.create_run(client.create_experiment("tune-unit")).info.run_id
    outcome = tasks.tune.run_trial(ref, trial._trial_id, trial_config, params,
                                   {32: (prepared.split("train"), prepared.split("val"))}, parent,
                                   tmp_path / "work", deadline=None)
    assert outcome.state == "PRUNED" and outcome.note.startswith("pruned after epoch 1")
    frozen = study.trials[trial.number]
    assert frozen.user_attrs["epochs"] == 1 and list(frozen.intermediate_values) == [1]
    child = client.get_run(frozen.user_attrs["mlflow_run_id"])
    assert child.info.status == "KILLED" and child.data.tags["mlflow.parentRunId"] == parent
    assert not (tmp_path / "work" / "checkpoints").exists() or not any((tmp_path / "work" / "checkpoints").iterdir())


def test_settings_an_earlier_trial_completed_are_not_trained_again(tmp_path, breast_dicom_dir, backbone_file):
    # TPE resamples a discrete space's best points; the repeat takes the earlier trial's value.
    config = load_config(tune_config(tmp_path, breast_dicom_dir, backbone_file))
    ref = StudyRef.for_config(config)
    study = ref.open(config.tune, config.seed)
    params = {"train.epochs": 2, "resolution": 32, "model.freeze": "full"}
    distributions = {"train.epochs": optuna.distributions.CategoricalDistribution([1, 2]),
                     "resolution": optuna.distributions.CategoricalDistribution([32, 48]),
                     "model.freeze": optuna.distributions.CategoricalDistribution(["head", "full"])}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=0.625,
                                              intermediate_values={1: 0.6, 2: 0.625}))
    repeat = study.ask(distributions)
    other = study.ask(distributions)
    client = MlflowClient(config.registry.tracking_uri)
    parent = client.create_run(client.create_experiment("tune-unit")).info.run_id
    trial_config = config.with_params(params)
    ingested = ingest_dataset(trial_config.data, trial_config.seed, trial_config.patient_salt())
    prepared = preprocess_dataset(ingested.manifest, trial_config.data.root, trial_config.preprocess)
    data = {32: (prepared.split("train"), prepared.split("val"))}

    outcome = tasks.tune.run_trial(ref, repeat._trial_id, trial_config, params, data, parent, tmp_path / "work",
                                   deadline=None)
    assert (outcome.state, outcome.value) == ("COMPLETE", 0.625)
    assert outcome.note == "same settings as trial 0: its value, not trained again"
    assert study.trials[repeat.number].user_attrs["epochs"] == 0
    assert client.get_run(study.trials[repeat.number].user_attrs["mlflow_run_id"]).data.metrics["value"] == 0.625

    # Other settings train (here the median pruner stops them after their one epoch).
    other_params = {**params, "train.epochs": 1}
    outcome = tasks.tune.run_trial(ref, other._trial_id, config.with_params(other_params), other_params, data, parent,
                                   tmp_path / "work", deadline=None)
    assert study.trials[other.number].user_attrs["epochs"] == 1 and not outcome.note.startswith("same settings")
