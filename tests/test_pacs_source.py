"""Training data from a real Orthanc: DICOMweb and DIMSE (C-GET, C-MOVE), against the folder source."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from configs import load_config
from tasks.ingest import ingest_dataset
from tasks.pacs.source import EXPORT_ROW_COLUMN, ingest_retrieved, prepare_pacs_dataset
from tasks.pacs.store import instance_key
from tasks.preprocess import preprocess_dataset
from tests.conftest import write_config
from tests.pacs_fixtures import write_pacs_config

SALT, SEED = "pacs-test-salt", 42
COMPARED = ["sha256", "pixel_sha256", "patient_key", "study_key", "instance_key", "split", "target", "label",
            "modality", "photometric", "transfer_syntax", "image_size", "frames", "sop_class", "body_part"]


def _expected_rejects(no_image_row: int, missing_row: int) -> dict[str, str]:
    """The export's RT-plan-only study and its study that is not on the PACS, by export row."""
    return {f"label export row {no_image_row}": ("no pixel data", str(no_image_row), "the study has no image on the "
                                                 "PACS that the query selects (Modality US)"),
            f"label export row {missing_row}": ("not found", str(missing_row),
                                                "no study with this AccessionNumber on the PACS")}


def _rejects(result) -> dict[str, tuple[str, str, str]]:
    return {path: (kind, rows, reason) for path, kind, rows, reason
            in result.rejects[["path", "kind", "rows", "reason"]].itertuples(index=False)}


def _pacs_ingest(tmp_path, sample, protocol="dicomweb", **overrides):
    config = load_config(write_pacs_config(tmp_path, sample, protocol, **overrides))
    selection = prepare_pacs_dataset(config, SALT)
    return config, selection, ingest_retrieved(config.data, SEED, SALT, selection.rejects_frame())


def test_folder_and_pacs_give_the_same_manifest_rejects_and_tensors(tmp_path, pacs_sample):
    (tmp_path / "folder").mkdir()
    folder_config = load_config(write_config(tmp_path / "folder", pacs_sample.folder))
    folder = ingest_dataset(folder_config.data, SEED, SALT)
    config, selection, pacs = _pacs_ingest(tmp_path / "pacs", pacs_sample)

    # Found on the PACS = retrieved + failed; the two label rows it could not give are rejects.
    assert selection.summary() == {"label_rows": 122, "found": 120, "already_held": 0, "retrieved": 120,
                                   "failed": 0, "source_rejects": 2, "reject_no_pixel_data": 1, "reject_not_found": 1}
    assert _rejects(pacs) == _expected_rejects(pacs_sample.no_image_row, pacs_sample.missing_row)
    assert pacs.summary() == folder.summary() | {"discovered": 122, "rejected": 2}

    # The same samples, keys and splits: WADO-RS gives the PACS's own bytes, so even the file hashes agree.
    by_file = [m.sort_values("sha256").reset_index(drop=True) for m in (folder.manifest, pacs.manifest)]
    pd.testing.assert_frame_equal(by_file[0][COMPARED], by_file[1][COMPARED])
    # The local copy is named by content and says which export row each file came from.
    local = pd.read_csv(config.data.manifest)
    assert all(path.endswith(f"{sha}.dcm") for path, sha in zip(by_file[1]["path"], by_file[1]["sha256"]))
    assert sorted(local[EXPORT_ROW_COLUMN]) == list(range(2, 122))

    # And the same tensors, each through its own cache.
    crops = []
    for manifest, cfg, cache in ((by_file[0], folder_config, "folder"), (by_file[1], config, "pacs")):
        pre = cfg.preprocess.model_copy(update={"cache_dir": tmp_path / f"cache-{cache}", "workers": 1})
        crops.append(preprocess_dataset(manifest, cfg.data.root, pre).images)
    assert crops[0].shape == (120, 224, 224)
    np.testing.assert_array_equal(crops[0], crops[1])


def test_a_second_run_retrieves_nothing_and_a_lost_file_is_fetched_again(tmp_path, pacs_sample):
    config, first, _ = _pacs_ingest(tmp_path, pacs_sample)
    assert first.retrieval.summary()["retrieved"] == 120
    second = prepare_pacs_dataset(config, SALT)
    assert second.retrieval.summary() == {"found": 120, "already_held": 120, "retrieved": 0, "failed": 0}
    # The store holds each instance once, by content hash.
    objects = sorted(config.pacs.store_dir.glob("objects/*/*.dcm"))
    assert len(objects) == 120 and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in objects)
    objects[0].unlink()
    third = prepare_pacs_dataset(config, SALT)
    assert third.retrieval.summary() == {"found": 120, "already_held": 119, "retrieved": 1, "failed": 0}


@pytest.mark.parametrize("retrieve", ["c-get", "c-move"])
def test_dimse_gives_the_same_samples_and_pixels(tmp_path, pacs_sample, retrieve):
    # C-MOVE costs Orthanc an association per instance (~0.1 s): 10 studies per split, the same rejects.
    export = pd.read_csv(pacs_sample.labels, dtype=str)
    subset = pd.concat([export.iloc[:-2].groupby("split").head(10), export.iloc[-2:]])
    subset.to_csv(tmp_path / "export.csv", index=False)
    labels = {"labels": {"path": str(tmp_path / "export.csv")}}
    _, _, web = _pacs_ingest(tmp_path / "web", pacs_sample, pacs=labels)
    _, selection, dimse = _pacs_ingest(tmp_path / "dimse", pacs_sample, "dimse",
                                       pacs={"dimse": {"retrieve": retrieve}} | labels)
    assert selection.summary()["retrieved"] == 30 and selection.summary()["failed"] == 0
    assert _rejects(dimse) == _expected_rejects(32, 33)
    # pynetdicom writes its own file meta, so file hashes differ; data set, pixels and keys do not.
    by_pixels = [m.sort_values("pixel_sha256").reset_index(drop=True) for m in (web.manifest, dimse.manifest)]
    same = [c for c in COMPARED if c != "sha256"]
    pd.testing.assert_frame_equal(by_pixels[0][same], by_pixels[1][same])


def test_a_failed_instance_is_a_reject_with_its_kind_and_the_run_goes_on(tmp_path, pacs_sample, monkeypatch):
    """An instance deleted between the search and its retrieval: WADO-RS answers 404."""
    from tasks.pacs import dicomweb
    real_fetch = dicomweb.DicomWebPacs.fetch
    gone: list[str] = []

    def fetch(self, ref):
        if not gone:  # the PACS loses the first instance asked for: point at an instance it does not hold
            gone.append(ref.sop_uid)
            ref = type(ref)(ref.study_uid, ref.series_uid, ref.sop_uid + ".9")
        return real_fetch(self, ref)
    monkeypatch.setattr(dicomweb.DicomWebPacs, "fetch", fetch)
    _, selection, result = _pacs_ingest(tmp_path, pacs_sample)
    assert selection.retrieval.summary() == {"found": 120, "already_held": 0, "retrieved": 119, "failed": 1,
                                             "failed_not_found": 1}
    rejects = _rejects(result)
    kind, rows, reason = rejects[f"pacs:{instance_key(gone[0], SALT)}"]
    assert (kind, reason) == ("not found", "WADO-RS retrieve answered HTTP 404 Not Found") and rows.isdigit()
    assert gone[0] not in str(rejects)
    assert result.summary()["discovered"] == 122 and len(result.manifest) == 119
