"""Score a folder of new studies with a served model: results and rejects, no patient data.

Files are named in the outputs only by the sha256 of their content: folder and
file names often hold patient names or ids, and a site can find a file again by
hashing its own copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from tasks.champion import Prediction, ServedModel
from tasks.rejects import UnreadableImage

REJECT_COLUMNS = ["file_sha256", "reason"]
CHUNK = 32  # files decoded and run together; bounds memory on large folders


@dataclass
class ScoreResult:
    scores: pd.DataFrame  # file_sha256, the prediction's fields, model_name, model_version
    rejects: pd.DataFrame  # file_sha256, reason
    discovered: int

    def summary(self) -> dict[str, int]:
        return {"discovered": self.discovered, "scored": len(self.scores), "rejected": len(self.rejects)}


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
    return body


def score_files(files: Sequence[Path], model: ServedModel,
                on_chunk: Callable[[int], None] | None = None,
                on_prediction: Callable[[str, Prediction], None] | None = None) -> ScoreResult:
    """Decode and score each file; unreadable files become rejects with the reason.
    `on_prediction(file_sha256, prediction)` gets each answer (the PACS mode makes its DICOM result)."""
    rows, rejects = [], []
    for chunk in _chunks(list(files), CHUNK):
        greys, keys = [], []
        for path in chunk:
            data = path.read_bytes()
            key = hashlib.sha256(data).hexdigest()
            try:
                greys.append(model.decode(path, data))
                keys.append(key)
            except UnreadableImage as exc:
                rejects.append((key, exc.reason))
        if greys:
            for key, prediction in zip(keys, model.predict(greys)):
                rows.append({"file_sha256": key, **_row(prediction),
                             "model_name": model.name, "model_version": model.version})
                if on_prediction:
                    on_prediction(key, prediction)
        if on_chunk:
            on_chunk(len(chunk))
    return ScoreResult(pd.DataFrame(rows), pd.DataFrame(rejects, columns=REJECT_COLUMNS), len(files))


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
    if not result.rejects.empty:
        lines += ["", "| reason | files |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in result.rejects["reason"].value_counts().items()]
    return "\n".join(lines)
