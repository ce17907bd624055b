"""Scoring's PACS mode: new studies on the PACS scored by the champion, results sent back as DICOM SRs.

Run once:   python -m flows.pacs_score configs/breast_ultrasound_pacs.yaml
On a schedule (a QIDO scan on pacs.scoring.cron): the `score-pacs/breast_ultrasound_pacs`
            deployment in prefect.yaml (`make deploy`, then `make worker`).
Pushed:     Orthanc's Python plugin (tasks/pacs/orthanc_trigger.py) creates a run of that deployment
            with `study_dates` when a study becomes stable.

Each new image is retrieved into the store, scored, and gets a Comprehensive SR in its own
study (tasks/dicom_results.py), sent by STOW-RS or C-STORE. Outputs keep no identifier:
`scores.csv` names files by content hash, as batch scoring does.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import pydicom
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs import DomainPolicy, PacsProtocol, PipelineConfig, ResultTransport, load_config
from flows.run_links import artifact_key
from flows.score import load_model
from flows.stages import with_io_retries
from tasks.champion import Prediction, ServedModel
from tasks.dicom_results import ModelIdentity
from tasks.io import write_csv_atomic
from tasks.pacs.client import connect
from tasks.pacs.query import InstanceRef
from tasks.pacs.retrieve import Retrieval, retrieve
from tasks.pacs.scoring import (REJECTED, SCORED, ResultsSent, ScoringLedger, Window, new_instances, scan_window,
                                send_results as send_pacs_results)
from tasks.pacs.store import InstanceStore, instance_key
from tasks.rejects import REJECT_COLUMNS, rejects_frame
from tasks.score import ScoreResult, reject_kinds_markdown, score_files

RESULT_BATCH = 32  # SRs per STOW-RS request / C-STORE association


@dataclass(frozen=True)
class PacsScoreSummary:
    counts: dict[str, int]
    watermark: str
    scores_csv: Path
    rejects_csv: Path
    model: str


# persist_result=False: these tasks return UIDs (in memory only), which result storage must never hold.
@task(name="pacs-find-new", cache_policy=NO_CACHE, persist_result=False)
def find_new(config: PipelineConfig, window: Window, ledger: ScoringLedger) -> tuple[list[InstanceRef], int]:
    pacs = connect(config.pacs)
    try:
        refs, seen = new_instances(pacs, config.pacs.query, window, ledger)
    finally:
        pacs.close()
    get_run_logger().info("%s: %d new images, %d scored before (%s)", pacs.name, len(refs), seen, window.reason)
    return refs, seen


@task(name="pacs-retrieve", cache_policy=NO_CACHE, persist_result=False)
def retrieve_new(config: PipelineConfig, refs: list[InstanceRef], salt: str) -> Retrieval:
    pacs = connect(config.pacs)
    try:
        with InstanceStore(config.pacs.store_dir, salt) as store:
            retrieval = retrieve(pacs, refs, store, config.pacs.max_parallel)
    finally:
        pacs.close()
    get_run_logger().info("retrieved from %s: %s in %.1f s", pacs.name, retrieval.summary(), retrieval.seconds)
    return retrieval


@task(name="score", cache_policy=NO_CACHE)
def score(paths: list[Path], model: ServedModel, policy: DomainPolicy) -> tuple[ScoreResult, dict[str, Prediction]]:
    """Every image scored gets its result (with the domain verdict); under `domain.policy: refuse`
    an out-of-domain image is a reject instead, and gets none."""
    predictions: dict[str, Prediction] = {}
    result = score_files(paths, model, policy, on_prediction=predictions.__setitem__)
    get_run_logger().info("scored: %s", result.summary())
    return result, predictions


@task(name="send-results", cache_policy=NO_CACHE, persist_result=False)
def send_results(config: PipelineConfig, scored: list[tuple[InstanceRef, Path, Prediction]], model: ServedModel,
                 ledger: ScoringLedger, salt: str) -> ResultsSent:
    transport = config.pacs.scoring.send_results
    if transport is ResultTransport.NONE:
        ledger.record([ref for ref, _, _ in scored], SCORED, model.version)
        return ResultsSent(0, {})
    protocol = PacsProtocol.DICOMWEB if transport is ResultTransport.STOW_RS else PacsProtocol.DIMSE
    pacs = connect(config.pacs, protocol)
    try:
        outcome = send_pacs_results(pacs, scored, ModelIdentity(model.name, model.version, model.variant), ledger,
                                    salt, RESULT_BATCH)
    finally:
        pacs.close()
    get_run_logger().info("sent %d results to %s over %s; %d images without one", outcome.sent, pacs.name,
                          transport.value, len(outcome.failed))
    return outcome


def _report(counts: dict[str, int], rejects: pd.DataFrame, window: Window, watermark: date | None,
            model: ServedModel, transport: ResultTransport) -> str:
    lines = [f"# PACS scoring with {model.name} v{model.version}", "",
             f"Scan: {window.reason}; watermark now {watermark.isoformat() if watermark else 'not set'}.", "",
             f"New images {counts['new']} = scored {counts['scored']} + rejected {counts['rejected']} "
             f"+ not retrieved {counts['failed']}; {counts['seen_before']} scored before.",
             f"Outside the training domain: {counts['out_of_domain']} (scored and flagged, or refused: "
             "`domain.policy`).",
             f"Results sent ({transport.value}): {counts['results_sent']}."]
    return "\n".join(lines + reject_kinds_markdown(rejects, "images"))


@flow(name="score-pacs")
def score_pacs(config_path: str, study_dates: list[str] | None = None) -> PacsScoreSummary:
    """Score the images of new studies on the config's PACS with the champion and send the results back."""
    config = load_config(config_path, check_paths=False)
    if config.pacs is None:
        raise ValueError(f"{config_path}: scoring from a PACS needs a pacs section")
    salt, today = config.patient_salt(), date.today()
    out_dir = config.run_dir / "pacs_scores" / str(runtime.flow_run.id)
    ledger = ScoringLedger(config.run_dir / "pacs_scoring.sqlite", salt)
    try:
        window = scan_window(ledger, config.pacs.scoring.since, config.pacs.scoring.lookback_days, today, study_dates)
        refs, seen = find_new(config, window, ledger)
        retrieval = retrieve_new(config, refs, salt)
        by_hash = {path.stem: (ref, path) for ref, path in retrieval.held + retrieval.retrieved}
        with tempfile.TemporaryDirectory(prefix="medxfer-pacs-score-") as download_dir:
            model = with_io_retries(load_model, config.registry)(config.registry.tracking_uri,
                                                                 config.registry.model_name, config.serve.variant,
                                                                 Path(download_dir))
            result, predictions = score([path for _, path in by_hash.values()], model, config.domain.policy)
        # A file the store cannot give back has no content hash (""): it stays unrecorded, so it is tried again.
        ledger.record([by_hash[key][0] for key in result.rejects["file_sha256"] if key in by_hash], REJECTED,
                      model.version)
        sent = send_results(config, [(*by_hash[key], prediction) for key, prediction in predictions.items()],
                            model, ledger, salt)
        watermark = ledger.advance([ref.study_date for ref in refs], today)
    finally:
        ledger.close()
    not_retrieved = [(f"pacs:{instance_key(ref.sop_uid, salt)}", failure) for ref, failure in retrieval.failed]
    # An image whose result is not in its record is a reject, not a score: scores.csv holds what went back.
    scores = result.scores[~result.scores["file_sha256"].isin(sent.failed)] if sent.failed else result.scores
    rejects = pd.concat([result.rejects.rename(columns={"file_sha256": "path"}),
                         rejects_frame([*sent.failed.items(), *not_retrieved])], ignore_index=True)
    rejects = rejects.reindex(columns=REJECT_COLUMNS)
    scores_csv = write_csv_atomic(scores, out_dir / "scores.csv")
    rejects_csv = write_csv_atomic(rejects, out_dir / "score_rejects.csv")
    counts = {"new": len(refs), "seen_before": seen, "scored": len(scores),
              "rejected": len(result.rejects) + len(sent.failed), "failed": len(retrieval.failed),
              "out_of_domain": len(result.out_of_domain), "results_sent": sent.sent}
    create_markdown_artifact(key=artifact_key(config.name, "pacs-scores"),
                             markdown=_report(counts, rejects, window, watermark, model,
                                              config.pacs.scoring.send_results),
                             description="PACS scoring summary")
    return PacsScoreSummary(counts, watermark.isoformat() if watermark else "", scores_csv, rejects_csv,
                            f"{model.name} v{model.version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="pipeline YAML with a pacs section")
    args = parser.parse_args()
    summary = score_pacs(str(args.config))
    print(f"{summary.counts} with {summary.model}; watermark {summary.watermark}\n"
          f"scores: {summary.scores_csv}\nrejects: {summary.rejects_csv}")


if __name__ == "__main__":
    main()
