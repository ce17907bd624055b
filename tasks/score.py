"""Score a folder of new studies with a served model: results and rejects, no patient data.

Files are named in the outputs only by the sha256 of their content: folder and
file names often hold patient names or ids, and a site can find a file again by
hashing its own copy. Every score carries the domain check's verdict; under
`domain.policy: refuse` an out-of-domain study is a reject instead, with the reasons.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from configs import DomainPolicy
from tasks.champion import Prediction, ServedModel
from tasks.decode import read_image_file
from tasks.rejects import RejectKind, UnreadableImage, exception_detail, one_line

log = logging.getLogger(__name__)

REJECT_COLUMNS = ["file_sha256", "kind", "reason"]
LISTED_OUT_OF_DOMAIN = 50  # the summary lists this many out-of-domain studies; the CSVs hold all
CHUNK = 32  # files run through the network together (as crops: each decoded image is dropped at once)


@dataclass
class ScoreResult:
    scores: pd.DataFrame  # file_sha256, the prediction's fields (in_domain, domain_score, ...), model
    rejects: pd.DataFrame  # REJECT_COLUMNS
    discovered: int
    out_of_domain: pd.DataFrame  # file_sha256, domain_score, reasons: scored or refused, either way

    def summary(self) -> dict[str, int]:
        return {"discovered": self.discovered, "scored": len(self.scores), "rejected": len(self.rejects),
                "out_of_domain": len(self.out_of_domain)}


def study_files(root: Path) -> list[Path]:
    """Every non-hidden file under `root`, in a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _row(prediction: Prediction) -> dict:
    body = dict(prediction.body)
    probabilities = body.pop("probabilities", None)
    if probabilities:
        body |= {f"p_{label}": p for label, p in probabilities.items()}
    body["domain_reasons"] = json.dumps(body["domain_reasons"])  # the reasons as data, in one CSV cell
    return body


def score_files(files: Sequence[Path], model: ServedModel, policy: DomainPolicy = DomainPolicy.FLAG,
                on_chunk: Callable[[int], None] | None = None,
                on_prediction: Callable[[str, Prediction], None] | None = None) -> ScoreResult:
    """Decode and score each file; a file that cannot be read or decoded becomes a reject
    with its kind and reason (whatever it raised: each file is its own fault boundary), and
    so does an out-of-domain file under the refuse policy (kind `out of domain`).
    `on_prediction(file_sha256, prediction)` gets each answer that is scored (the PACS mode
    makes its DICOM result)."""
    rows, rejects, outside = [], [], []
    for chunk in _chunks(list(files), CHUNK):
        crops, facts, keys = [], [], []
        for path in chunk:
            key = ""  # a file that cannot be read has no content hash
            try:
                data = read_image_file(path)
                key = hashlib.sha256(data).hexdigest()
                prepared = model.prepare(path, data)
                crops.append(prepared.crop)
                facts.append(prepared.facts)
                keys.append(key)
            except UnreadableImage as exc:
                rejects.append((key, exc.kind.value, exc.detail))
            except Exception as exc:
                log.debug("unexpected error scoring a file", exc_info=True)
                rejects.append((key, RejectKind.UNEXPECTED.value, exception_detail(exc)))
        if crops:
            for key, prediction in zip(keys, model.predict(crops, facts)):
                verdict = prediction.domain
                if verdict.in_domain is False:
                    reasons = "; ".join(verdict.messages())
                    outside.append((key, verdict.score, reasons))
                    if policy is DomainPolicy.REFUSE:
                        rejects.append((key, RejectKind.OUT_OF_DOMAIN.value, one_line(reasons)))
                        continue
                rows.append({"file_sha256": key, **_row(prediction),
                             "model_name": model.name, "model_version": model.version})
                if on_prediction:
                    on_prediction(key, prediction)
        if on_chunk:
            on_chunk(len(chunk))
    return ScoreResult(pd.DataFrame(rows), pd.DataFrame(rejects, columns=REJECT_COLUMNS), len(files),
                       pd.DataFrame(outside, columns=["file_sha256", "domain_score", "reasons"]))


def summary_markdown(result: ScoreResult, model: ServedModel) -> str:
    counts = result.summary()
    lines = [f"# Scored with {model.name} v{model.version} ({model.variant}, {model.provider})", "",
             f"Discovered {counts['discovered']} = scored {counts['scored']} + rejected {counts['rejected']}", ""]
    scores = result.scores
    if not scores.empty and "label" in scores:
        lines += ["| prediction | studies |", "|---|---|"]
        lines += [f"| {label} | {n} |" for label, n in scores["label"].value_counts().sort_index().items()]
    elif not scores.empty:
        ages = scores["age_years"].to_numpy()
        lines += [f"Predicted age: median {np.median(ages):.1f} years, range {ages.min():.1f}-{ages.max():.1f}"]
    lines += reject_kinds_markdown(result.rejects, "files")
    lines += ["", _domain_summary(result.out_of_domain, model)]
    return "\n".join(lines)


def reject_kinds_markdown(rejects: pd.DataFrame, counted: str) -> list[str]:
    """Markdown lines: a table of the rejects by kind (none when there are none)."""
    if rejects.empty:
        return []
    return ["", f"| reject kind | {counted} |", "|---|---|",
            *(f"| {kind} | {n} |" for kind, n in rejects["kind"].value_counts().items())]


def _domain_summary(outside: pd.DataFrame, model: ServedModel) -> str:
    """How many studies were outside the training domain, and which (by content hash), with why."""
    if model.domain_check is None:
        return f"{model.name} v{model.version} has no domain check: no study was checked against its training domain."
    if outside.empty:
        return "Out of domain: none (every decoded study is like the training data)."
    listed = outside.head(LISTED_OUT_OF_DOMAIN)
    lines = [f"Out of domain: **{len(outside)}** studies (threshold {model.domain_check.threshold:.4g}).", "",
             "| file_sha256 | domain_score | reasons |", "|---|---|---|"]
    lines += [f"| {row.file_sha256} | {row.domain_score:.4g} | {row.reasons} |" for row in listed.itertuples()]
    if len(outside) > len(listed):
        lines += ["", f"... and {len(outside) - len(listed)} more (scores.csv / score_rejects.csv)."]
    return "\n".join(lines)
