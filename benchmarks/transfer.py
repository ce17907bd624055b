"""Does transfer learning beat training from scratch? Measured on real data.

Grid: datasets (BUSI 256 px ultrasound with the official BreastMNIST splits, benign vs
malignant; NIH chest X-rays, age regression on a patient-disjoint re-split made by
tasks.ingest) x strategies (head, partial, full, auto) x weights ((a) random init,
(b) a ResNet-18 source model pretrained here on PneumoniaMNIST) x training-set sizes
(50, 200, all) x seeds. Each run: test AUC + accuracy or MAE with percentile-bootstrap
95% intervals, wall time, and training throughput (images/s).

The random-init backbone is never frozen (models.resnet.resolve_freeze), so for (a)
head/partial/auto resolve to `full`: the script trains that once and reports it for
each strategy label, with the strategy actually used. `auto` with pretrained weights
resolves to whatever `model.auto_full_threshold` says for that size; the resolved run
is shared, not trained twice.

Reduced grid (default, for a 2-core CPU): 64 px, 2 seeds, short schedules.
`--full`: 224 px, 3 seeds, longer schedules; meant for a CUDA GPU (train.device auto).

Run: flock /tmp/medxfer-bench.lock python -m benchmarks.transfer [--full] [--seeds N]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks.machine import machine
from configs import DataConfig, FreezeStrategy, ModelConfig, PreprocessConfig, TaskKind, TaskSpec, TrainConfig
from models.resnet import build_model, resolve_freeze
from tasks.evaluate import bootstrap_intervals, compute_metrics, predict
from tasks.ingest import ingest_dataset
from tasks.io import sha256_file
from tasks.preprocess import SplitData, preprocess_dataset
from tasks.transforms import PreprocessSpec, to_model_input
from tasks.train import train_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BUSI = SHARED / "busi256" / "breastmnist_split_busi256.npz"
PNEUMONIA = SHARED / "pneumoniamnist" / "pneumoniamnist.npz"
NIH = SHARED / "nih_cxr_age"
OUT = REPO / "benchmarks" / "results"
LABEL_NAMES = ["benign", "malignant"]  # BreastMNIST encodes 0 = malignant, 1 = normal or benign
# A fixed, public salt: the benchmark's NIH split must be the same on every machine.
BENCHMARK_SALT = "medxfer-transfer-benchmark"
STRATEGIES = [s for s in FreezeStrategy]
ALL = "all"


@dataclass(frozen=True)
class Grid:
    resolution: int
    seeds: int
    sizes: tuple[int | str, ...]
    epochs: dict[int | str, int]  # per training-set size: small sets get more passes
    pretrain_epochs: int
    batch_size: int
    bootstrap_samples: int
    precision: str = "fp32"  # train.precision; bf16 is ~3x faster on CPUs with native bf16
    channels_last: bool = False


REDUCED = Grid(resolution=64, seeds=2, sizes=(50, 200, ALL), epochs={50: 10, 200: 6, ALL: 4},
               pretrain_epochs=2, batch_size=32, bootstrap_samples=1000)
FULL = Grid(resolution=224, seeds=3, sizes=(50, 200, ALL), epochs={50: 40, 200: 25, ALL: 15},
            pretrain_epochs=10, batch_size=32, bootstrap_samples=2000)


@dataclass(frozen=True)
class Dataset:
    name: str
    task: TaskKind
    train: SplitData
    val: SplitData
    test: SplitData
    label_names: list[str]

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind=self.task, label_names=tuple(self.label_names))  # positive: the last class


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    spec = PreprocessSpec(resize=size, crop=size)
    return np.stack([spec.to_uint8(image / 255.0)[0] for image in images])


def load_busi(size: int) -> Dataset:
    """BUSI at `size` px with the official BreastMNIST splits; target 1 = malignant."""
    data = np.load(BUSI)
    splits = {name: SplitData(_resized(data[f"{name}_images"], size),
                              (data[f"{name}_labels"].ravel() == 0).astype(np.float32))
              for name in ("train", "val", "test")}
    return Dataset("BUSI (BreastMNIST splits)", TaskKind.CLASSIFICATION, **splits, label_names=LABEL_NAMES)


def load_nih(size: int, cache_dir: Path) -> Dataset:
    """NIH chest X-rays with ages, re-split by patient (the CSV's own split leaks patients)."""
    data = DataConfig(root=NIH, manifest=NIH / "labels_with_age.csv", task=TaskKind.REGRESSION,
                      columns={"age": "patient_age"}, use_manifest_split=False, age_range=(0, 110))
    ingested = ingest_dataset(data, seed=42, salt=BENCHMARK_SALT)
    prepared = preprocess_dataset(ingested.manifest, NIH, PreprocessConfig(resize=size, crop=size,
                                                                           cache_dir=cache_dir))
    return Dataset("NIH chest X-ray age (patient-disjoint re-split)", TaskKind.REGRESSION,
                   prepared.split("train"), prepared.split("val"), prepared.split("test"), [])


def subsample(split: SplitData, size: int | str, task: TaskKind, seed: int) -> SplitData:
    """A seeded random subset (stratified by class for classification)."""
    if size == ALL or size >= len(split):
        return split
    stratify = split.targets if task is TaskKind.CLASSIFICATION else None
    rows, _ = train_test_split(np.arange(len(split)), train_size=size, random_state=seed, stratify=stratify)
    return SplitData(split.images[np.sort(rows)], split.targets[np.sort(rows)])


def model_config(weights: str, weights_sha256: str | None, strategy: FreezeStrategy) -> ModelConfig:
    return ModelConfig(arch="resnet18", weights=weights, weights_sha256=weights_sha256, freeze=strategy)


def train_settings(epochs: int, grid: Grid) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=grid.batch_size, patience=4, precision=grid.precision,
                       channels_last=grid.channels_last)


def pretrain_source(grid: Grid, workdir: Path) -> tuple[Path, str, dict]:
    """ResNet-18 trained from scratch on PneumoniaMNIST (28 px, upsampled to the grid size).

    Kept as a state-dict file with its sha256 and reused when already there, so every
    fine-tune run names it by `model.weights` + `model.weights_sha256`.
    """
    path = workdir / f"pneumoniamnist_resnet18_{grid.resolution}px_{grid.pretrain_epochs}ep.pt"
    info = {"epochs": grid.pretrain_epochs}
    if not path.exists():
        data = np.load(PNEUMONIA)
        splits = {name: SplitData(_resized(data[f"{name}_images"], grid.resolution),
                                  data[f"{name}_labels"].ravel().astype(np.float32)) for name in ("train", "val")}
        info["train_images"] = len(splits["train"])
        started = time.perf_counter()
        result = train_model(model_config("none", None, FreezeStrategy.FULL), train_settings(grid.pretrain_epochs, grid),
                             TaskSpec(kind=TaskKind.CLASSIFICATION, label_names=("normal", "pneumonia")), 0,
                             splits["train"], splits["val"])
        info |= {"seconds": time.perf_counter() - started, "val_roc_auc": result.best_metric,
                 "images_per_second": float(np.median([e.images_per_second for e in result.history]))}
        torch.save(result.model.backbone.cpu().state_dict(), path)  # a plain torchvision ResNet state dict
        print(f"pretrained source model: {info}", flush=True)
    return path, sha256_file(path), info


def source_model(grid: Grid, workdir: Path, registered: str | None, tracking_uri: str | None) -> tuple[str, str | None, dict]:
    """The pretrained source: a registered one (`--source mlflow:/<name>@<alias>`, e.g. from
    flows/pretrain.py), or one trained here by `pretrain_source`. Returns weights, sha256, description."""
    if registered:
        _, info = build_model(ModelConfig(weights=registered), TaskKind.CLASSIFICATION, 2, tracking_uri=tracking_uri)
        return registered, None, {"registered": info.name, "sha256": info.sha256}
    path, sha, info = pretrain_source(grid, workdir)
    return str(path), sha, {"file": path.name, "sha256": sha, **info}


def run_one(dataset: Dataset, train: SplitData, model: ModelConfig, epochs: int, grid: Grid, seed: int,
            tracking_uri: str | None) -> dict:
    started = time.perf_counter()
    result = train_model(model, train_settings(epochs, grid), dataset.spec, seed, train, dataset.val,
                         tracking_uri=tracking_uri)
    outputs = predict(result.model, dataset.test.images, grid.batch_size, result.device)
    wall = time.perf_counter() - started
    positive = dataset.spec.positive_index
    metrics = compute_metrics(dataset.task, dataset.test.targets, outputs, positive)
    intervals = bootstrap_intervals(dataset.task, dataset.test.targets, outputs, positive, grid.bootstrap_samples, seed)
    row = {"strategy_used": result.strategy.value, "device": result.device, "epochs_run": len(result.history),
           "best_epoch": result.best_epoch, "wall_s": wall,
           "train_images_per_s": float(np.median([e.images_per_second for e in result.history]))}
    for name in ("roc_auc", "accuracy", "mae"):
        if name in metrics:
            row[name] = metrics[name]
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = intervals[name]
    return row


def no_skill_baseline(dataset: Dataset) -> str:
    """What a model that ignores the image scores: the majority class, or the training mean age."""
    if dataset.task is TaskKind.CLASSIFICATION:
        majority = float(np.bincount(dataset.train.targets.astype(int)).argmax())
        return f"accuracy {np.mean(dataset.test.targets == majority):.3f} (majority class), AUC 0.5"
    return f"MAE {np.abs(dataset.test.targets - dataset.train.targets.mean()).mean():.2f} (training mean age)"


def run_grid(grid: Grid, datasets: list[str], seeds: range, workdir: Path, rows_csv: Path,
             registered_source: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """Run the grid; each row is appended to `rows_csv` as it finishes, so a cut-off run keeps its rows."""
    workdir.mkdir(parents=True, exist_ok=True)
    source, source_sha, source_info = source_model(grid, workdir, registered_source, tracking_uri)
    weight_choices = {"random init": ("none", None), "PneumoniaMNIST-pretrained": (source, source_sha)}
    loaders = {"busi": lambda: load_busi(grid.resolution),
               "nih": lambda: load_nih(grid.resolution, workdir / "cache")}
    rows = []
    for key in datasets:
        dataset = loaders[key]()
        print(f"{dataset.name}: train {len(dataset.train)}, val {len(dataset.val)}, test {len(dataset.test)}; "
              f"no-skill baseline: {no_skill_baseline(dataset)}", flush=True)
        for seed in seeds:
            for size in grid.sizes:
                train = subsample(dataset.train, size, dataset.task, seed)
                done: dict[tuple[str, FreezeStrategy], dict] = {}
                for weights_label, (weights, sha) in weight_choices.items():
                    for strategy in STRATEGIES:
                        used, _ = resolve_freeze(model_config(weights, sha, strategy), len(train), weights != "none")
                        if (weights_label, used) not in done:
                            done[(weights_label, used)] = run_one(dataset, train, model_config(weights, sha, used),
                                                                  grid.epochs[size], grid, seed, tracking_uri)
                            fresh = True
                        else:
                            fresh = False
                        row = {"dataset": key, "seed": seed, "size": str(size), "n_train": len(train),
                               "weights": weights_label, "strategy": strategy.value, "trained": fresh,
                               **done[(weights_label, used)]}
                        rows.append(row)
                        pd.DataFrame([row]).to_csv(rows_csv, mode="a", header=not rows_csv.exists(), index=False)
                        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    frame = pd.DataFrame(rows)
    frame.attrs["source"] = source_info
    return frame


@torch.inference_mode()
def linear_probe(grid: Grid, workdir: Path, registered_source: str | None, tracking_uri: str | None) -> dict[str, float]:
    """Diagnostic for `head`: test AUC of sklearn's logistic regression on standardised frozen source features.

    `head` runs the same kind of fit (tasks.train.fit_linear_head); this is the independent
    reference it should match on all BUSI training images.
    """
    weights, sha, _ = source_model(grid, workdir, registered_source, tracking_uri)
    model, _ = build_model(model_config(weights, sha, FreezeStrategy.HEAD), TaskKind.CLASSIFICATION, 2,
                           tracking_uri=tracking_uri)
    model.eval()
    busi = load_busi(grid.resolution)
    features = {name: model.backbone(to_model_input(torch.from_numpy(split.images))).numpy()
                for name, split in (("train", busi.train), ("test", busi.test))}
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(features["train"], busi.train.targets)
    return {"probe_test_roc_auc": float(roc_auc_score(busi.test.targets, probe.predict_proba(features["test"])[:, 1])),
            "feature_mean": float(features["train"].mean()),
            "feature_per_dim_std_median": float(np.median(features["train"].std(axis=0)))}


def summary_tables(frame: pd.DataFrame) -> str:
    """Markdown: per dataset, size, weights and strategy, the seed mean (sd), the mean bootstrap CI over
    test cases [..], and the t-interval of the mean over seeds {..}."""
    lines = []
    for key, part in frame.groupby("dataset", sort=False):
        metrics = ["roc_auc", "accuracy"] if key == "busi" else ["mae"]
        header = " | ".join(f"{m} mean (sd) [mean 95% CI] {{95% t-interval over seeds}}" for m in metrics)
        lines += ["", f"#### {key}", "", f"| n train | weights | strategy (used) | {header} | wall s | train img/s |",
                  "|---|---|---|" + "---|" * len(metrics) + "---|---|"]
        for (size, weights, strategy), cell in part.groupby(["size", "weights", "strategy"], sort=False):
            used = "/".join(sorted(set(cell["strategy_used"])))
            values = " | ".join(
                f"{cell[m].mean():.3f} ({cell[m].std(ddof=0):.3f}) "
                f"[{cell[f'{m}_ci_low'].mean():.3f}, {cell[f'{m}_ci_high'].mean():.3f}] "
                "{{{1:.3f}, {2:.3f}}}".format(*mean_interval(cell[m])) for m in metrics)
            lines.append(f"| {cell['n_train'].iloc[0]} | {weights} | {strategy} ({used}) | {values} | "
                         f"{cell['wall_s'].mean():.1f} | {cell['train_images_per_s'].median():.1f} |")
    return "\n".join(lines)


def mean_interval(values: pd.Series, confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean over seeds and a t-interval for it: how well the seeds pin the mean down."""
    values = values.dropna()
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def paired_table(frame: pd.DataFrame) -> str:
    """Pretrained minus random init, seed by seed (the same subset and seed), with a t-interval over seeds."""
    lines = ["| dataset | n train | pretrained strategy (used) | metric | seeds | mean difference [95% t-interval over seeds] "
             "| seeds where pretrained is better |", "|---|---|---|---|---|---|---|"]
    for (key, size), part in frame.groupby(["dataset", "size"], sort=False):
        metrics = ["roc_auc", "accuracy"] if key == "busi" else ["mae"]
        scratch = part[part["weights"] == "random init"].drop_duplicates("seed").set_index("seed")
        for strategy, cell in part[part["weights"] != "random init"].groupby("strategy", sort=False):
            cell = cell.set_index("seed")
            seeds = cell.index.intersection(scratch.index)
            for metric in metrics:
                difference = cell.loc[seeds, metric] - scratch.loc[seeds, metric]
                better = (difference > 0) if metric != "mae" else (difference < 0)
                mean, low, high = mean_interval(difference)
                used = "/".join(sorted(set(cell["strategy_used"])))
                lines.append(f"| {key} | {cell['n_train'].iloc[0]} | {strategy} ({used}) | {metric} | {len(seeds)} | "
                             f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] | {int(better.sum())} of {len(seeds)} |")
    return "\n".join(lines)


def throughput_table(frame: pd.DataFrame) -> str:
    trained = frame[frame["trained"]]
    lines = ["| dataset | strategy used | device | median train img/s | runs |", "|---|---|---|---|---|"]
    for (key, used, device), cell in trained.groupby(["dataset", "strategy_used", "device"]):
        lines.append(f"| {key} | {used} | {device} | {cell['train_images_per_s'].median():.1f} | {len(cell)} |")
    return "\n".join(lines)


def report(frame: pd.DataFrame, header: str) -> str:
    return f"{header}\n{summary_tables(frame)}\n\n{paired_table(frame)}\n\n{throughput_table(frame)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="224 px, 3 seeds, long schedules (CUDA GPU)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="continue a grid cut off after some seeds")
    parser.add_argument("--datasets", nargs="+", default=["busi", "nih"], choices=["busi", "nih"])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/medxfer/benchmark"))
    # On a CPU shared with other jobs, 2 intra-op threads ran ~10x slower than 1 (spinning
    # threads waiting for each other), so the shared-machine run sets 1.
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="CSV",
                        help="no training: tables from the row files of earlier (partial) runs")
    parser.add_argument("--probe", action="store_true", help="only the frozen-feature linear probe on BUSI")
    parser.add_argument("--source", metavar="mlflow:/NAME@ALIAS",
                        help="a registered source model (flows/pretrain.py) instead of pretraining one here")
    parser.add_argument("--tracking-uri", help="the MLflow store that holds --source")
    parser.add_argument("--resolution", type=int, help="override the grid's image size (px)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="override train.precision")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last")
    parser.add_argument("--sizes", nargs="+", help="override the training-set sizes (numbers, or 'all')")
    parser.add_argument("--epochs", type=int, help="override the epochs at every size")
    args = parser.parse_args()
    if args.report:
        frame = pd.concat([pd.read_csv(path, dtype={"size": str}) for path in args.report], ignore_index=True)
        print(report(frame, f"rows from: {', '.join(map(str, args.report))}"))
        return
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = FULL if args.full else REDUCED
    overrides = {"seeds": args.seeds, "resolution": args.resolution, "precision": args.precision,
                 "channels_last": args.channels_last or None}
    grid = Grid(**{**asdict(grid), **{k: v for k, v in overrides.items() if v is not None}})
    if args.sizes:
        sizes = tuple(ALL if size == ALL else int(size) for size in args.sizes)
        epochs = {size: args.epochs or grid.epochs.get(size, grid.epochs[ALL]) for size in sizes}
        grid = Grid(**{**asdict(grid), "sizes": sizes, "epochs": epochs})
    elif args.epochs:
        grid = Grid(**{**asdict(grid), "epochs": {size: args.epochs for size in grid.sizes}})
    missing = [p for p in (BUSI, PNEUMONIA, NIH) if not p.exists()]
    if missing:
        raise SystemExit(f"benchmark data not found: {', '.join(map(str, missing))}")
    if args.probe:
        print(f"machine: {machine()}\nlinear probe, {grid.resolution} px, all BUSI training images: "
              f"{linear_probe(grid, args.workdir / f'{grid.resolution}px', args.source, args.tracking_uri)}")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    rows_csv = OUT / f"transfer_{grid.resolution}px_{time.strftime('%Y%m%dT%H%M%S')}.csv"
    print(f"machine: {machine()}\ngrid: {grid}\nrows: {rows_csv}", flush=True)
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + grid.seeds)
    frame = run_grid(grid, args.datasets, seeds, args.workdir / f"{grid.resolution}px", rows_csv,
                     args.source, args.tracking_uri)
    total = time.perf_counter() - started
    text = report(frame, f"machine: {machine()}\ngrid: {grid}, seeds {list(seeds)}\n"
                         f"source model: {frame.attrs['source']}\ntotal wall time: {total / 60:.1f} min")
    rows_csv.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
