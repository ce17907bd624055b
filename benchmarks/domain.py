"""The input-domain check (issue 12): how well it separates, and what it costs.

    nice -n 19 .venv/bin/python -m benchmarks.domain accuracy     # metrics only: no lock needed
    flock -x /tmp/medxfer-bench.lock .venv/bin/python -m benchmarks.domain latency

`accuracy` trains both shipped tasks as their configs say (breast_ultrasound on the bundled
BreastMNIST sample written as DICOM, chest_xray_age on the NIH X-rays in ../shared/data), fits
the domain check with each novelty method, and evaluates it against the configs' held-out
out-of-domain images (tasks.domain_eval). Goals: novelty AUROC >= 0.99 against other modalities
and >= 0.95 against the same modality with other anatomy; in-domain false rejection <= 2%.

`latency` times batch-1 ONNX Runtime calls at 224 px on the CPU with and without the domain
output, baseline in the same run, alternating the two in rounds. Goal: <= 10% added.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml

from benchmarks.machine import machine
from configs import ConfigError, ModelConfig, NoveltyMethod, TaskKind, load_config
from models.resnet import build_model
from sample_data.breastmnist import write_breastmnist_dicom
from tasks.domain import fit_novelty
from tasks.domain_eval import fit_and_evaluate
from tasks.evaluate import compute_metrics, no_skill_outputs, predict, skill_metrics
from tasks.export import CPU_PROVIDER, INPUT_NAME, export_onnx, export_self_contained
from tasks.ingest import ingest_dataset
from tasks.preprocess import preprocess_dataset
from tasks.train import train_model
from tasks.transforms import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]
GOALS = {"other_modality": 0.99, "same_modality_other_anatomy": 0.95}
MAX_FALSE_REJECTION, MAX_ADDED_LATENCY = 0.02, 0.10


def shipped_config(name: str, work: Path):
    """A shipped config with its outputs, cache and registry under `work`; the breast sample
    written out as DICOM there, as `make run` does."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["output_dir"] = str(work / "outputs")
    raw["preprocess"]["cache_dir"] = str(work / "cache")
    raw["registry"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    if name == "breast_ultrasound":
        root = work / "breastmnist-dicom"
        write_breastmnist_dicom(root)
        raw["data"]["root"], raw["data"]["manifest"] = str(root), str(root / "manifest.csv")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def accuracy(names: list[str], out: Path) -> None:
    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tasks": {}}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"medxfer-domain-{name}-") as tmp:
            work = Path(tmp)
            try:
                config = shipped_config(name, work)
            except ConfigError as exc:  # its data is absent (../shared/data)
                print(f"{name}: skipped ({exc})")
                continue
            started = time.perf_counter()
            ingested = ingest_dataset(config.data, config.seed, "benchmark-salt")
            prepared = preprocess_dataset(ingested.manifest, config.data.root, config.preprocess)
            trained = train_model(config.model, config.train, config.task_spec, config.seed, prepared.split("train"),
                                  prepared.split("val"), tracking_uri=config.registry.tracking_uri)
            test, spec = prepared.split("test"), config.task_spec
            outputs = predict(trained.model, test.images, 32, trained.device)
            # The model's own skill beside the check's: features of a model that learnt nothing carry little.
            no_skill = no_skill_outputs(spec.kind, prepared.targets("train"), len(test), spec.num_outputs)
            task = {"train_seconds": round(time.perf_counter() - started, 1), "strategy": trained.strategy.value,
                    "weights": trained.weights.describe(),
                    "test_metrics": compute_metrics(spec.kind, test.targets, outputs, spec.positive_index)
                    | skill_metrics(spec.kind, test.targets, outputs, no_skill, spec.positive_index),
                    "splits": {s: int((prepared.manifest["split"] == s).sum()) for s in ("train", "val", "test")},
                    "methods": {}}
            for method in NoveltyMethod:
                domain = config.domain.model_copy(update={"method": method})
                method_config = config.model_copy(update={"domain": domain})
                fit, evaluation = fit_and_evaluate(method_config, trained.model, prepared)
                task["methods"][method.value] = {
                    "threshold": fit.check.threshold, "parameters": fit.check.parameters,
                    "false_rejection": evaluation.false_rejection,
                    "false_rejection_ci": evaluation.false_rejection_interval,
                    "val_images": evaluation.val_images,
                    "false_rejection_expected_bound": evaluation.expected_false_rejection,
                    "false_rejection_upper_bound": evaluation.false_rejection_upper_bound,
                    "false_rejection_novelty": evaluation.false_rejection_novelty,
                    "undecodable": evaluation.undecodable, "skipped": evaluation.skipped,
                    "groups": {g.group.value: {"images": g.images, "auroc": g.auroc, "ci": g.interval,
                                               "flagged_by_novelty": g.flagged_by_novelty, "flagged": g.flagged}
                               for g in evaluation.groups},
                    "by_kind": evaluation.by_kind.to_dict(orient="records")}
                print(f"\n## {name}, {method.value}\n\n{evaluation.body()}", flush=True)
            results["tasks"][name] = task
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{machine()}\nwritten: {out}")
    for name, task in results["tasks"].items():
        for method, result in task["methods"].items():
            verdicts = [f"{group} AUROC {g['auroc']:.4f} (goal {GOALS[group]}: "
                        f"{'met' if g['auroc'] >= GOALS[group] else 'NOT met'})"
                        for group, g in result["groups"].items()]
            frr = result["false_rejection"]
            print(f"{name} {method}: {'; '.join(verdicts)}; false rejection {frr:.1%} "
                  f"(goal <= {MAX_FALSE_REJECTION:.0%}: {'met' if frr <= MAX_FALSE_REJECTION else 'NOT met'})")


def _median_ms(session: ort.InferenceSession, feed: dict, seconds: float) -> list[float]:
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def latency(rounds: int, seconds: float, bank: int) -> None:
    """Batch-1 latency at 224 px with and without `domain_score`, both novelty methods; the
    weights are random (speed does not depend on them), the kNN bank has `bank` images."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0].eval()
    features = np.random.default_rng(0).normal(size=(bank, model.feature_dim))
    print(machine())
    with tempfile.TemporaryDirectory(prefix="medxfer-domain-latency-") as tmp:
        work = Path(tmp)
        graphs = {"baseline": export_onnx(model, TaskKind.CLASSIFICATION, work / "base.onnx", 224, 18, {})}
        for method in NoveltyMethod:
            novelty, _ = fit_novelty(features, method)
            graphs[method.value] = export_onnx(model, TaskKind.CLASSIFICATION, work / f"{method.value}.onnx",
                                               224, 18, {}, novelty)
        spec_metadata = {"preprocess": PreprocessSpec().to_metadata()}  # short side 256, centre crop 224
        graphs |= {f"{name}, self-contained": export_self_contained(path, work / f"{name}_full.onnx", spec_metadata)
                   for name, path in list(graphs.items())}
        image = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
        grey = np.random.default_rng(2).uniform(size=(1, 1, 224, 224)).astype(np.float32)
        sessions = {name: ort.InferenceSession(str(path), providers=[CPU_PROVIDER]) for name, path in graphs.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):  # alternate, so that load from other work falls on every graph alike
            for name, session in sessions.items():
                feed = {"grey": grey} if "self-contained" in name else {INPUT_NAME: image}
                session.run(None, feed)
                times[name] += _median_ms(session, feed, seconds)
    print(f"\nbatch 1, 224 px, CPU, {rounds} rounds x {seconds:g} s per graph\n")
    print("| graph | median ms | p90 ms | calls | added vs its baseline |\n|---|---|---|---|---|")
    for name, values in times.items():
        base = "baseline, self-contained" if "self-contained" in name else "baseline"
        median, reference = float(np.median(values)), float(np.median(times[base]))
        added = "-" if name == base else f"{median / reference - 1:+.1%}"
        print(f"| {name} | {median:.2f} | {np.percentile(values, 90):.2f} | {len(values)} | {added} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--tasks", nargs="+", default=["breast_ultrasound", "chest_xray_age"])
    acc.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "domain_accuracy.json")
    lat = sub.add_parser("latency")
    lat.add_argument("--rounds", type=int, default=6)
    lat.add_argument("--seconds", type=float, default=5.0)
    lat.add_argument("--bank", type=int, default=546, help="kNN training images (BreastMNIST's train split)")
    args = parser.parse_args()
    if args.part == "accuracy":
        accuracy(args.tasks, args.out)
    else:
        latency(args.rounds, args.seconds, args.bank)


if __name__ == "__main__":
    main()
