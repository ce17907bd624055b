"""Shared fixtures: real BreastMNIST images written as DICOM, and configs pointing at them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from configs import PipelineConfig, load_config
from sample_data.breastmnist import write_breastmnist_dicom

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (real API, SQLite) for every flow-run test."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def breast_dicom_dir(tmp_path_factory) -> Path:
    """A small real subset: 40 train, 20 val, 30 test BreastMNIST images as DICOM."""
    root = tmp_path_factory.mktemp("breastmnist-dicom")
    write_breastmnist_dicom(root, per_split=40)
    return root


def write_config(tmp_path: Path, data_root: Path, **overrides) -> Path:
    """A breast_ultrasound config for `data_root`, outputs under tmp_path, with overrides merged in."""
    raw = yaml.safe_load((REPO / "configs" / "breast_ultrasound.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "outputs")
    raw["data"]["root"] = str(data_root)
    raw["data"]["manifest"] = str(data_root / "manifest.csv")
    raw["preprocess"]["cache_dir"] = str(tmp_path / "cache")
    raw["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def breast_config(tmp_path, breast_dicom_dir) -> PipelineConfig:
    return load_config(write_config(tmp_path, breast_dicom_dir))
