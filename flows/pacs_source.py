"""The training flow's PACS stage: the label export's studies retrieved into data.root (tasks/pacs/source.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from configs import PipelineConfig
from flows.run_links import artifact_key
from flows.stages import stage
from tasks.io import write_text_atomic
from tasks.pacs.query import describe
from tasks.pacs.source import PacsSelection, prepare_pacs_dataset


def retrieval_report(selection: PacsSelection) -> str:
    counts, retrieval = selection.summary(), selection.retrieval
    rate = len(retrieval.retrieved) / retrieval.seconds if retrieval.seconds else 0.0
    lines = [f"# PACS retrieval from {selection.server}", "",
             f"Label export: {counts['label_rows']} rows; {counts['source_rejects']} rejected before or during "
             "retrieval (see the rejects table).",
             f"Found {counts['found']} = already held {counts['already_held']} + retrieved {counts['retrieved']} "
             f"+ failed {counts['failed']}, in {retrieval.seconds:.1f} s ({rate:.0f} images/s, "
             f"{retrieval.bytes_retrieved / 1e6:.1f} MB)."]
    kinds = {k: v for k, v in counts.items() if k.startswith(("failed_", "reject_"))}
    if kinds:
        lines += ["", "| kind | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in kinds.items()]]
    return "\n".join(lines)


@stage(name="pacs-retrieve")
def retrieve_training_data(config: PipelineConfig, run_dir: Path) -> pd.DataFrame:
    """Fill data.root and data.manifest from the PACS; the label rows and instances it could not give,
    as rejects for ingest to count (export rows and salted instance keys: the persisted result holds no
    identifier). A retried flow run that had got past it does not ask the PACS again."""
    logger = get_run_logger()
    logger.info("retrieving the label export's studies (%s) from the PACS", describe(config.pacs.query))
    selection = prepare_pacs_dataset(config, config.patient_salt())
    counts = selection.summary()
    logger.info("PACS %s: %s in %.1f s", selection.server, counts, selection.retrieval.seconds)
    write_text_atomic(run_dir / "pacs_retrieval.json",
                      json.dumps(counts | {"server": selection.server, "seconds": selection.retrieval.seconds}, indent=2))
    mlflow.log_artifact(str(run_dir / "pacs_retrieval.json"), "data")
    mlflow.log_metrics({f"pacs_{key}": value for key, value in counts.items()})
    create_markdown_artifact(key=artifact_key(config.name, "pacs-retrieval"),
                             markdown=retrieval_report(selection), description="PACS retrieval: found = held + retrieved + failed")
    return selection.rejects_frame()
