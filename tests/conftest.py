"""Shared fixtures: real BreastMNIST images written as DICOM, and configs pointing at them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from pydicom.data import get_testdata_file

from configs import DomainConfig, ModelConfig, PipelineConfig, TaskKind, load_config
from models.resnet import build_model
from sample_data.breastmnist import write_breastmnist_dicom
from tasks.domain import DomainFit, fit_domain, image_features
from tasks.export import INPUT_NAME, NORMALISED_FILE, export_onnx, export_self_contained, serving_metadata
from tasks.decode import load_grey
from tasks.ingest import header_facts, read_dicom_header
from tasks.formats import detect_format
from tasks.transforms import PreprocessSpec
from tasks.register import Registration, register_model, tracking_run
from tests import damaged

# The operations tests' real Prefect server, worker, MLflow UI and flow runs, shared by
# test_prefect_server.py and test_ui_browser.py.
# Fixtures of their own modules: real Prefect servers and workers (ops), a real Orthanc (PACS).
pytest_plugins = ["tests.ops_runs", "tests.pacs_fixtures"]

REPO = Path(__file__).resolve().parents[1]
SPEC = PreprocessSpec()  # the champion_registry model's preprocessing: short side 256, centre crop 224


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (real API, SQLite) for every flow-run test; the stages'
    persisted results go to a temporary folder too."""
    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield


@pytest.fixture(scope="session")
def breast_dicom_dir(tmp_path_factory) -> Path:
    """A small real subset: 40 train, 20 val, 30 test BreastMNIST images as DICOM."""
    root = tmp_path_factory.mktemp("breastmnist-dicom")
    write_breastmnist_dicom(root, per_split=40)
    return root


@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, pd.DataFrame]:
    """Real files in several syntaxes and colour models, with damaged ones between them: cut
    short, a text file, a palette image without its palette and a CT whose RescaleSlope is no
    number (the last two raised out of the worker processes once)."""
    root = tmp_path / "mixed"
    root.mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm", "US1_UNCR.dcm", "JPEG2000.dcm",
             "emri_small_RLE.dcm", "MR_small_bigendian.dcm", "SC_ybr_full_422_uncompressed.dcm"]
    for name in names:
        shutil.copyfile(_testdata(name), root / name)
    (root / "cut.dcm").write_bytes(_testdata("CT_small.dcm").read_bytes()[:-500])
    (root / "notes.dcm").write_text("not an image")
    (root / "palette_without_lut.dcm").write_bytes(damaged.palette_without_lookup_table())
    (root / "slope_not_a_number.dcm").write_bytes(damaged.rescale_slope_not_a_number())
    order = ["CT_small.dcm", "cut.dcm", *names[1:5], "notes.dcm", "palette_without_lut.dcm", *names[5:],
             "slope_not_a_number.dcm"]
    return root, pd.DataFrame({"path": order, "label": "x"})


MIXED_REJECTS = {"cut.dcm": "truncated", "notes.dcm": "not an image", "palette_without_lut.dcm": "corrupt",
                 "slope_not_a_number.dcm": "corrupt"}  # mixed_folder's damaged files and their kinds


def write_config(tmp_path: Path, data_root: Path, **overrides) -> Path:
    """A breast_ultrasound config for `data_root`, outputs under tmp_path, with overrides merged in."""
    raw = yaml.safe_load((REPO / "configs" / "breast_ultrasound.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "outputs")
    raw["data"]["root"] = str(data_root)
    raw["data"]["manifest"] = str(data_root / "manifest.csv")
    raw["preprocess"]["cache_dir"] = str(tmp_path / "cache")
    raw["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The tests' models train an epoch or two on 40 images: they have no skill (one scored test AUC
    # 0.27), and the tests that need a champion from them are about what happens around it. The
    # skill gate itself: tests/test_register_export.py; the default stays on (tests/test_config.py).
    raw["registry"]["require_skill"] = False
    # A few real held-out images keep the domain evaluation real and the tests quick.
    raw["domain"]["out_of_domain"] = [{"group": "other_modality", "pydicom": ["CT", "RTDOSE"]}]
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def qc_section(report: str, heading: str) -> list[list[str]]:
    """The cells of each body row of the table under `## heading` in a QC report (none for "None.")."""
    section = report.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # rows[0] is the header


def phi_strings(data_root: Path) -> set[str]:
    """Every identifying value in the input DICOMs' headers, as it might be written out."""
    found = set()
    for path in data_root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(keyword, "")).strip()
            if value:
                found |= {value, value.replace("^", " ")}
    return found


@pytest.fixture
def breast_config(tmp_path, breast_dicom_dir) -> PipelineConfig:
    return load_config(write_config(tmp_path, breast_dicom_dir))


def register_version(config: PipelineConfig, model, onnx_path: Path, auc: float) -> Registration:
    """A registry version of `model` whose run reports test AUC `auc`."""
    with tracking_run(config, "champion-test") as run_id:
        mlflow.log_metric("test_roc_auc", auc)
        return register_model(config, run_id, model, onnx_path, "roc_auc", True, torch.zeros(1, 3, 224, 224))


@pytest.fixture(scope="module")
def classifier():
    """A seeded random-weights ResNet-18 classifier: real graphs, predictions that mean nothing."""
    torch.manual_seed(0)
    return build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0].eval()


def header_record(path: Path) -> dict[str, object]:
    """A file's header facts as ingest records them in the manifest (`tasks.ingest.header_facts`)."""
    data = path.read_bytes()
    fmt = detect_format(data)
    return header_facts(data, fmt, read_dicom_header(data, fmt, pixels=False))


def fit_breast_domain(model, dicom_dir: Path) -> DomainFit:
    """The domain check of `model` fitted on the BreastMNIST ultrasound DICOMs' train split and
    thresholded on their val split, as the pipeline fits it (header facts from ingest's columns)."""
    manifest = pd.read_csv(dicom_dir / "manifest.csv")
    splits = {}
    for split in ("train", "val"):
        paths = [dicom_dir / rel for rel in manifest.loc[manifest["split"] == split, "path"]]
        crops = np.stack([SPEC.to_uint8(load_grey(path)[0])[0] for path in paths])
        facts = pd.DataFrame([header_record(path) for path in paths])
        splits[split] = image_features(model, crops), facts
    return fit_domain(splits["train"][0], splits["val"][0], splits["train"][1], DomainConfig())


@pytest.fixture(scope="session")
def champion_registry(tmp_path_factory, breast_dicom_dir):
    """A real MLflow SQLite registry whose champion (v1) is a self-contained ONNX export of a
    random-weights ResNet-18 classifier, with a domain check fitted on real breast ultrasound
    DICOMs: serving and scoring paths are real, the predictions mean nothing (the domain check's
    header facts do). Returns (config, model, onnx path)."""
    tmp_path = tmp_path_factory.mktemp("champion-registry")
    config = PipelineConfig.model_validate({
        "name": "champion-test", "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path), "manifest": str(tmp_path / "m.csv"), "task": "classification",
                 "label_names": ["benign", "malignant"], "positive_label": "malignant"},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "serve-test"},
    })
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0].eval()
    metadata = serving_metadata(task=TaskKind.CLASSIFICATION, label_names=["benign", "malignant"],
                                positive_index=1, operating_threshold=None, spec=SPEC,
                                metrics={"roc_auc": 0.7}, training_data="0" * 64, weights_name="none",
                                weights_sha256="none", model_name="serve-test")
    domain = fit_breast_domain(model, breast_dicom_dir)
    metadata |= domain.check.to_metadata()
    normalised = export_onnx(model, TaskKind.CLASSIFICATION, tmp_path / NORMALISED_FILE, 224, 18, metadata,
                             domain.novelty)
    full = export_self_contained(normalised, tmp_path / "model.onnx", metadata)
    register_version(config, model, full, auc=0.70)
    return config, model, full


def decoded_as_trained(path: Path | str) -> np.ndarray:
    """A file decoded as preprocessing decodes it for the champion's resize (JPEG 2000 may
    decode at reduced resolution)."""
    return load_grey(Path(path), floor=SPEC.decode_floor)[0]


def evaluated_outputs(onnx_path: Path, greys: Sequence[np.ndarray]) -> np.ndarray:
    """What evaluation gives for decoded images, one at a time: the spec's transform, then the
    normalised graph exported beside `onnx_path` (the graph the parity gate compares with PyTorch)."""
    session = ort.InferenceSession(str(onnx_path.parent / NORMALISED_FILE), providers=["CPUExecutionProvider"])
    crops = [SPEC.to_uint8(grey)[0] for grey in greys]
    return np.concatenate([session.run(None, {INPUT_NAME: SPEC.normalise(torch.from_numpy(crop)).numpy()})[0]
                           for crop in crops])

