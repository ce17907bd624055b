"""Fuzzing as a test: damaged copies of real files (pydicom-data's, of every encoding, and a real PNG):
cut at random offsets, bits flipped in their headers, invalid values in pixel-relevant elements and in
the file meta (tests/damaged.py: `mutate`). Seeded, so a failure names a case that can be rerun. Every
file is usable or a reject with a kind, through ingest and preprocess (the process pool) and through
the live service; none raises, none gets a 5xx. benchmarks/fuzz.py runs thousands."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pandas as pd
import pytest

from configs import PreprocessConfig, ServeConfig
from serve.app import Settings, create_app
from tasks import preprocess as pp
from tasks.ingest import ingest_dataset
from tasks.rejects import RejectKind
from tests import damaged
from tests.live_server import LiveServer

SEED = 10
PIPELINE_CASES, SERVICE_CASES = 300, 150
KINDS = {kind.value for kind in RejectKind}


@pytest.mark.filterwarnings("ignore")  # damaged files make every library complain
def test_damaged_real_files_are_usable_or_a_reject_with_a_kind_through_ingest_and_preprocess(
        tmp_path, breast_dicom_dir):
    # The fuzzed files among the real subset's training rows, so that ingest can split.
    root = tmp_path / "data"
    shutil.copytree(breast_dicom_dir, root)
    data, cases = damaged.add_fuzzed_files(root, SEED, PIPELINE_CASES)

    ingested = ingest_dataset(data, seed=0, salt="fuzz")
    prepared = pp.preprocess_dataset(ingested.manifest, root, PreprocessConfig(cache_dir=tmp_path / "cache",
                                                                               workers=2))
    rejects = prepared.rejects_with(ingested.rejects)
    usable = set(prepared.manifest["path"])
    assert ingested.discovered == len(usable) + len(rejects) == 120 + PIPELINE_CASES
    rejected = dict(zip(rejects["path"], rejects["kind"]))
    assert set(cases) == (set(cases) & usable) | (set(cases) & set(rejected))
    assert set(rejected.values()) <= KINDS - {RejectKind.WORKER_DIED.value}
    assert not rejects["reason"].str.contains("\n").any()
    # The usable ones are images: uint8 crops of the model's size.
    assert prepared.images.shape[1:] == (224, 224) and prepared.images.dtype == np.uint8
    # Every kind of damage was tried, and each both passed and failed somewhere: the cases are varied.
    outcome = pd.DataFrame({"how": cases.values(), "usable": [path in usable for path in cases]})
    assert set(outcome["how"]) == {"truncate", "bit flips", "pixel element", "file meta"}
    assert 0.1 < outcome["usable"].mean() < 0.9


@pytest.fixture(scope="module")
def service(champion_registry):
    config, _, _ = champion_registry
    settings = Settings(config.registry.tracking_uri, config.registry.model_name,
                        ServeConfig(batch_window_ms=5), api_key=None)
    server = LiveServer(create_app(settings))
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore")
def test_the_live_service_answers_every_damaged_real_file_with_200_or_a_4xx_of_its_kind(service):
    statuses, kinds = [], []
    with httpx.Client(timeout=120) as client:
        for name, data, _ in damaged.fuzzed(SEED + 1, SERVICE_CASES):
            content_type = "image/png" if name.endswith(".png") else "application/dicom"
            response = client.post(f"{service.url}/v1/predict", content=data, headers={"Content-Type": content_type})
            statuses.append(response.status_code)
            if response.status_code != 200:
                kinds.append(response.json()["kind"])
    assert all(status == 200 or 400 <= status < 500 for status in statuses), sorted(set(statuses))
    assert set(kinds) <= KINDS
    assert 200 in statuses and len(set(statuses)) > 2
