"""Issue 14's evidence: tuned configs on BUSI and NIH ages, the search's cost against an exhaustive grid,
learning curves, all through the product's own flows (tune, pipeline, learning curve) on real data.

Steps (each a subcommand; they share --workdir, which holds the data folders, configs, the MLflow
store and the Optuna studies):

  prepare     BUSI 256 px (official BreastMNIST splits) as DICOM, NIH ages with a fixed patient-disjoint
              split written into a manifest, and the base configs with their search spaces
  search      flows.tune on a dataset (validation only), within the search's time budget
  final       flows.pipeline on a tuned config, N seeds, with random init and with the source model
  grid        the same discrete space searched exhaustively (Optuna's grid, no pruning) and by TPE with
              median pruning; their cost in epochs, images and seconds, and the best validation found
  curve       flows.learning_curve on a tuned config
  report      the tables for benchmarks/RESULTS.md from the rows written so far

The source model is the one flows.pretrain registers (`--source mlflow:/<name>@<alias>`). Needs
../shared/data. Accuracy runs: `nice -n 19`, without the benchmark lock (see TEAM.md); the grid step
reports seconds, so say what else ran, and compare it by trained epochs and images as well.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.machine import machine
from benchmarks.transfer import BENCHMARK_SALT, BUSI, NIH, mean_interval
from configs import DataConfig, TaskKind, load_config
from sample_data.breastmnist import write_breastmnist_dicom
from tasks.ingest import ingest_dataset
from tasks.io import write_csv_atomic

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
# The published BreastMNIST bar (MedMNIST v2, Yang et al. 2023, Table; MedMNIST+, Doerrich et al. 2024).
PUBLISHED = [("MedMNIST v2, ResNet-18 (28 px upsampled to 224)", "none", 0.891, 0.833),
             ("MedMNIST v2, ResNet-50 (28 px upsampled to 224)", "none", 0.866, 0.842),
             ("MedMNIST+, ResNet-18, full fine-tune, 224 px", "ImageNet", 0.899, 0.872)]


def _space(classification: bool, source: str | None, resolutions: list[int]) -> dict:
    space = {"train.lr": {"low": 2e-4, "high": 3e-3, "log": True},
             "train.weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
             "train.epochs": {"choices": [15, 30, 45]},
             "train.batch_size": {"choices": [16, 32]},
             "augment_strength": {"low": 0.0, "high": 1.0},
             "resolution": {"choices": resolutions}}
    if classification:
        space["train.class_balance"] = {"choices": ["none", "weighted_loss", "balanced_sampler"]}
    if source:
        space |= {"model.weights": {"choices": ["none", source]},
                  "model.freeze": {"choices": ["head", "partial", "full"]},
                  "model.frozen_stages": {"low": 1, "high": 3},
                  "train.backbone_lr_factor": {"low": 0.03, "high": 1.0, "log": True},
                  "train.warmup_head_epochs": {"choices": [0, 2]}}
    return space


def base_config(name: str, data: dict, preprocess: dict, workdir: Path, model_name: str, space: dict,
                minutes: float, trials: int, allow_flip: bool) -> dict:
    return {"name": name, "seed": 0, "output_dir": str(workdir / "outputs"), "data": data,
            "preprocess": {**preprocess, "cache_dir": str(workdir / "cache")},
            "model": {"arch": "resnet18", "weights": "none", "freeze": "full"},
            "train": {"epochs": 30, "batch_size": 32, "lr": 1e-3, "patience": 8, "precision": "bf16",
                      "channels_last": True, "augment": {"allow_flip": allow_flip}},
            "registry": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "issue14",
                         "model_name": model_name},
            "evaluate": {"bootstrap_samples": 2000, "gradcam_images": 2},
            "export": {"int8": False, "fp16": False},
            "tune": {"space": space, "trials": trials, "timeout_minutes": minutes, "parallel_trials": 2,
                     "startup_trials": 10, "warmup_epochs": 4, "train_best": False},
            "learning_curve": {"sizes": [25, 50, 100, 200, 400], "seeds": 3, "bootstrap_samples": 1000,
                               "flat_gain": 0.01 if data["task"] == "classification" else 0.25, "mark": 50}}


def prepare(workdir: Path, source: str | None, minutes: float, trials: int) -> None:
    """Data folders and base configs; the NIH split is made once (seed 42, a public salt) and kept."""
    busi_dir = workdir / "busi-dicom"
    if not (busi_dir / "manifest.csv").exists():
        write_breastmnist_dicom(busi_dir, npz_path=BUSI)  # 0 = malignant, as BreastMNIST; the manifest names it
    busi = {"root": str(busi_dir), "manifest": str(busi_dir / "manifest.csv"), "task": "classification",
            "label_names": ["benign", "malignant"], "positive_label": "malignant"}
    nih_manifest = workdir / "nih_manifest.csv"
    if not nih_manifest.exists():
        config = DataConfig(root=NIH, manifest=NIH / "labels_with_age.csv", task=TaskKind.REGRESSION,
                            columns={"age": "patient_age"}, use_manifest_split=False, age_range=(0, 110))
        ingested = ingest_dataset(config, seed=42, salt=BENCHMARK_SALT).manifest
        labels = pd.read_csv(NIH / "labels_with_age.csv").set_index("path")
        write_csv_atomic(pd.DataFrame({"path": ingested["path"], "age": ingested["target"],
                                       "patient_id": labels.loc[ingested["path"], "patient_id"].to_numpy(),
                                       "split": ingested["split"]}), nih_manifest)
    nih = {"root": str(NIH), "manifest": str(nih_manifest), "task": "regression", "age_range": [0, 110],
           "patient_salt": BENCHMARK_SALT}
    configs = {
        # BUSI is 256 px; MedMNIST v2's ResNet-18 reached AUC 0.901 at 28 px, so small sizes are in the space
        # (and fit a CPU). Breast ultrasound: left-right flips do not change a lesion's appearance.
        # Searched from random initialisation (the "without ImageNet"); the source model is then
        # compared on the tuned settings (`final --weights none <source>`).
        "busi": base_config("busi", busi, {"resize": 256, "crop": 224}, workdir, "busi-resnet18",
                            _space(True, None, [32, 48, 64]), minutes, trials, allow_flip=True),
        # The NIH images are 64 px PNGs: 64 is native, 96 upsampled; no crop. Chest X-rays are not flipped.
        "nih": base_config("nih", nih, {"resize": 64, "crop": 64}, workdir, "nih-age-resnet18",
                           _space(False, source, [64, 96]), minutes, trials, allow_flip=False),
    }
    for key, raw in configs.items():
        path = workdir / f"{key}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        load_config(path)
        print(f"wrote {path}")


def search(config_path: Path) -> None:
    from flows.tune import tune_hyperparameters
    from tasks.tune import StudyRef, search_cost

    started = time.time()
    summary = tune_hyperparameters(str(config_path))
    config = load_config(config_path)
    study = StudyRef.for_config(config).open(config.tune, config.seed)
    cost = search_cost(study, config)
    row = {"config": str(config_path), "study": summary.study, "machine": machine(),
           "wall_s": time.time() - started, "trials": json.dumps(summary.trials), "best_trial": summary.best_trial,
           "best_val": summary.best_value, "best_params": json.dumps(summary.best_params),
           "best_config": str(summary.best_config), "epochs": cost.epochs, "images": cost.images,
           "trial_seconds": cost.seconds, "unpruned_epochs": cost.unpruned_epochs,
           "load_1min_end": Path("/proc/loadavg").read_text().split()[0]}
    _append(OUT / "tuning_search.csv", row)
    print(json.dumps(row, indent=1))


def final(config_path: Path, seeds: int, weights: list[str], label: str, first_seed: int = 0) -> None:
    """The tuned config through the pipeline: each weights choice x seed, test metrics with their intervals."""
    from flows.pipeline import train_pipeline
    from mlflow import MlflowClient

    raw = yaml.safe_load(config_path.read_text())
    for weight in weights:
        for seed in range(first_seed, first_seed + seeds):
            variant = {**raw, "seed": seed, "name": f"{raw['name']}-final"}
            variant["model"] = {**raw["model"], "weights": weight}
            variant["model"].pop("weights_sha256", None)
            path = config_path.with_name(f"{config_path.stem}-{Path(weight).name.replace(':', '')}-seed{seed}.yaml")
            path.write_text(yaml.safe_dump(variant, sort_keys=False))
            started = time.time()
            summary = train_pipeline(str(path))
            config = load_config(path)
            run = MlflowClient(config.registry.tracking_uri).get_run(summary.registration.run_id)
            metrics = run.data.metrics
            keep = ("roc_auc", "accuracy", "sensitivity", "specificity", "mae", "rmse", "r2")
            row = {"label": label, "config": str(config_path), "weights": weight, "seed": seed,
                   "strategy": run.data.params.get("freeze_strategy_used"),
                   "resolution": config.preprocess.crop, "epochs_run": len(
                       MlflowClient(config.registry.tracking_uri).get_metric_history(run.info.run_id, "val_metric")),
                   "wall_s": time.time() - started, "machine": machine(),
                   **{f"test_{k}{suffix}": metrics.get(f"test_{k}{suffix}") for k in keep
                      for suffix in ("", "_ci_low", "_ci_high") if f"test_{k}" in metrics}}
            _append(OUT / "tuning_final.csv", row)
            print(row, flush=True)


# The discrete space of the grid comparison: 3 x 2 x 2 x 2 = 24 points, 20 epochs each, at 32 px, random init.
GRID_SPACE = {"train.lr": {"choices": [3e-4, 1e-3, 3e-3]}, "train.weight_decay": {"choices": [1e-4, 1e-2]},
              "augment_strength": {"choices": [0.0, 0.5]}, "train.class_balance": {"choices": ["none", "weighted_loss"]}}
GRID_EPOCHS, GRID_RESOLUTION = 20, 32


def grid_versus_search(config_path: Path, minutes: float) -> None:
    """The same discrete space: every grid point unpruned, then TPE with median pruning for as many trials."""
    from flows.tune import tune_hyperparameters
    from tasks.tune import StudyRef, search_cost

    raw = yaml.safe_load(config_path.read_text())
    points = int(np.prod([len(param["choices"]) for param in GRID_SPACE.values()]))
    for sampler, pruner in (("grid", "none"), ("tpe", "median")):
        variant = {**raw, "name": f"{raw['name']}-{sampler}",
                   "preprocess": {**raw["preprocess"], "crop": GRID_RESOLUTION,
                                  "resize": round(GRID_RESOLUTION * raw["preprocess"]["resize"] / raw["preprocess"]["crop"])},
                   "model": {**raw["model"], "weights": "none", "freeze": "full"},
                   "train": {**raw["train"], "epochs": GRID_EPOCHS},
                   "tune": {**raw["tune"], "space": GRID_SPACE, "sampler": sampler, "pruner": pruner,
                            "timeout_minutes": minutes, "trials": points, "startup_trials": 6}}
        path = config_path.with_name(f"{config_path.stem}-{sampler}.yaml")
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        started = time.time()
        summary = tune_hyperparameters(str(path))
        config = load_config(path)
        cost = search_cost(StudyRef.for_config(config).open(config.tune, config.seed), config)
        row = {"sampler": sampler, "pruner": pruner, "grid_points": points, "trials": json.dumps(summary.trials),
               "best_val": summary.best_value, "best_params": json.dumps(summary.best_params),
               "epochs": cost.epochs, "images": cost.images, "trial_seconds": cost.seconds,
               "wall_s": time.time() - started, "machine": machine(),
               "load_1min_end": Path("/proc/loadavg").read_text().split()[0]}
        _append(OUT / "tuning_grid.csv", row)
        print(row, flush=True)


def curve(config_path: Path, seeds: int | None) -> None:
    from flows.learning_curve import learning_curve_flow

    if seeds:
        raw = yaml.safe_load(config_path.read_text())
        raw["learning_curve"]["seeds"] = seeds
        config_path = config_path.with_name(f"{config_path.stem}-curve{seeds}.yaml")
        config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    summary = learning_curve_flow(str(config_path))
    table = pd.read_csv(summary.table)
    table["config"], table["machine"] = str(config_path), machine()
    name = f"learning_curve_{load_config(config_path).name}_{time.strftime('%Y%m%dT%H%M%S')}"
    write_csv_atomic(table, OUT / f"{name}.csv")
    (OUT / f"{name}.md").write_text(f"{summary.answer}\n\nwall {time.time() - started:.0f} s; {machine()}\n")
    print(summary.answer)


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)


def report() -> None:
    final_rows = pd.read_csv(OUT / "tuning_final.csv")
    for label, rows in final_rows.groupby("label", sort=False):
        metrics = ["roc_auc", "accuracy"] if "test_roc_auc" in rows and rows["test_roc_auc"].notna().any() else ["mae"]
        print(f"\n#### {label}\n\n| weights | seeds | strategy | resolution | " +
              " | ".join(f"test {m}: mean over seeds [95% t-interval]; mean bootstrap CI" for m in metrics) + " |")
        print("|---|---|---|---|" + "---|" * len(metrics))
        for weights, cell in rows.groupby("weights", sort=False):
            cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*mean_interval(cell[f"test_{m}"])) +
                     f"; [{cell[f'test_{m}_ci_low'].mean():.3f}, {cell[f'test_{m}_ci_high'].mean():.3f}]"
                     for m in metrics]
            print(f"| {weights} | {len(cell)} | {'/'.join(sorted(set(cell['strategy'])))} | "
                  f"{'/'.join(map(str, sorted(set(cell['resolution']))))} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "search", "final", "grid", "curve", "report"])
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--config", type=Path, help="search/final/grid/curve: the config to use")
    parser.add_argument("--source", help="prepare: the registered source model, mlflow:/<name>@<alias>")
    parser.add_argument("--minutes", type=float, default=60.0, help="prepare/grid: the search's time budget")
    parser.add_argument("--trials", type=int, default=200, help="prepare: the most trials a search runs")
    parser.add_argument("--seeds", type=int, help="final: seeds per weights (default 3); curve: seeds per size")
    parser.add_argument("--first-seed", type=int, default=0, help="final: seeds run from this one (to resume)")
    parser.add_argument("--weights", nargs="+", default=["none"], help="final: model.weights to compare")
    parser.add_argument("--label", default="tuned", help="final: the row group's name in the report")
    args = parser.parse_args()
    missing = [p for p in (BUSI, NIH) if not p.exists()]
    if missing:
        raise SystemExit(f"benchmark data not found: {', '.join(map(str, missing))}")
    print(f"machine: {machine()}", flush=True)
    if args.step == "prepare":
        prepare(args.workdir, args.source, args.minutes, args.trials)
    elif args.step == "search":
        search(args.config)
    elif args.step == "final":
        final(args.config, args.seeds or 3, args.weights, args.label, args.first_seed)
    elif args.step == "grid":
        grid_versus_search(args.config, args.minutes)
    elif args.step == "curve":
        curve(args.config, args.seeds)
    else:
        report()


if __name__ == "__main__":
    main()
