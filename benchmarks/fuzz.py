"""Fuzzing in long mode (issue 10): thousands of damaged copies of real files through ingest and
preprocess, and through the live service, with the counts of what became of them.

The cases are tests/damaged.py's (`fuzzed`: pydicom-data files of every encoding and a real PNG,
cut at random offsets, bits flipped in their headers, invalid values in pixel-relevant elements
and in the file meta), seeded, so a failure names a case that can be rerun. tests/test_fuzz.py
runs a few hundred of the same on CI; this runs as many as asked. Counts, not timings: it needs
no exclusive lock, but it keeps both cores busy for a while, so run it niced:

    env PYTHONPATH=$PWD nice -n 19 .venv/bin/python -m benchmarks.fuzz [--cases 5000] [--service-cases 2000]

A smoke run (checks that it works, counts not kept): --cases 40 --service-cases 20.
It exits non-zero when a file raised, a reject had no kind, or the service answered a 5xx.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd

from benchmarks.inference import random_champion, start_service
from benchmarks.machine import machine
from configs import PreprocessConfig
from sample_data.breastmnist import write_breastmnist_dicom
from tasks.ingest import ingest_dataset
from tasks.preprocess import preprocess_dataset
from tasks.rejects import RejectKind
from tests import damaged

KINDS = {kind.value for kind in RejectKind}


def pipeline_counts(work: Path, seed: int, cases: int) -> tuple[pd.DataFrame, list[str]]:
    """Each fuzzed file's damage and outcome (`usable` or its reject kind) through ingest and the
    process pool, among a real BreastMNIST subset so that ingest can split; and the problems."""
    root = work / "data"
    write_breastmnist_dicom(root, per_split=40)
    data, how = damaged.add_fuzzed_files(root, seed, cases)
    ingested = ingest_dataset(data, seed=0, salt="fuzz")
    prepared = preprocess_dataset(ingested.manifest, root, PreprocessConfig(cache_dir=work / "cache", workers=2))
    rejects = prepared.rejects_with(ingested.rejects)
    kind_of = dict(zip(rejects["path"], rejects["kind"]))
    usable = set(prepared.manifest["path"])
    outcome = pd.DataFrame({"damage": list(how.values()),
                            "outcome": ["usable" if path in usable else kind_of.get(path, "MISSING") for path in how]})
    problems = []
    if ingested.discovered != len(usable) + len(rejects):
        problems.append(f"counts do not reconcile: {ingested.discovered} found, {len(usable)} usable, "
                        f"{len(rejects)} rejected")
    problems += [f"{path}: no outcome" for path in how if path not in usable and path not in kind_of]
    problems += [f"reject kind {kind!r} is not a RejectKind" for kind in set(kind_of.values()) - KINDS]
    if rejects["reason"].str.contains("\n").any():
        problems.append("a reject reason spans lines")
    return outcome, problems


def service_counts(work: Path, seed: int, cases: int) -> tuple[pd.DataFrame, list[str]]:
    """Each fuzzed body's damage, status and kind from the real service (python -m serve)."""
    model, _, onnx_path = random_champion(work)
    process, url = start_service(work, onnx_path, model)
    rows, problems = [], []
    try:
        with httpx.Client(timeout=120) as client:
            for name, data, what in damaged.fuzzed(seed, cases):
                content_type = "image/png" if name.endswith(".png") else "application/dicom"
                response = client.post(f"{url}/v1/predict", content=data, headers={"Content-Type": content_type})
                kind = "" if response.status_code == 200 else response.json().get("kind", "NONE")
                rows.append((what, response.status_code, kind))
                if response.status_code >= 500 or (kind and kind not in KINDS):
                    problems.append(f"{name} (seed {seed}): {response.status_code} {response.text[:200]}")
    finally:
        process.terminate()
        process.wait(timeout=60)
    return pd.DataFrame(rows, columns=["damage", "status", "kind"]), problems


def table(frame: pd.DataFrame, rows: str, columns: str) -> str:
    counts = pd.crosstab(frame[rows], frame[columns], margins=True, margins_name="all")
    header = f"| {rows} | " + " | ".join(map(str, counts.columns)) + " |"
    lines = [header, "|" + "---|" * (len(counts.columns) + 1)]
    lines += [f"| {index} | " + " | ".join(str(int(v)) for v in row) + " |" for index, row in counts.iterrows()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000, help="damaged files through ingest and preprocess")
    parser.add_argument("--service-cases", type=int, default=2000, help="damaged bodies to the live service")
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    print(f"Machine: {machine()}; seed {args.seed}")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medxfer-fuzz-") as tmp:
        outcome, found = pipeline_counts(Path(tmp) / "pipeline", args.seed, args.cases)
        problems += found
        print(f"\nIngest + preprocess (process pool, 2 workers): {len(outcome)} damaged files, "
              f"{(outcome['outcome'] == 'usable').sum()} usable, the rest rejects by kind\n")
        print(table(outcome, "damage", "outcome"))
        answers, found = service_counts(Path(tmp) / "service", args.seed + 1, args.service_cases)
        problems += found
        statuses = Counter(answers["status"])
        print(f"\nLive service: {len(answers)} damaged bodies; statuses "
              + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())) + "\n")
        answer = (answers["status"].astype(str) + " " + answers["kind"]).str.strip()
        print(table(answers.assign(answer=answer), "damage", "answer"))
    print(f"\nProblems: {len(problems)}")
    for line in problems[:50]:
        print(f"- {line}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
