"""No identifier reaches a console: the pipeline's CLI and the service, each a real process whose
stdout and stderr are captured, fed real files damaged so that their headers' identifiers (markers)
are what the readers complain about. The same run shows that a pipeline over a folder of damaged
files finishes and accounts for every file, and that no marker reaches a file it writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from prefect.settings import PREFECT_API_URL

from stack.settings import free_port
from tests import damaged
from tests.conftest import REPO, write_config

SALT = "phi-console-salt-31c9"


def _environment(**extra: str) -> dict[str, str]:
    """This environment, with the checkout first on the path (the subprocess imports this code)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MEDXFER_PATIENT_SALT": SALT, **extra}


def _leaks(text: str) -> set[str]:
    return {marker for marker in damaged.MARKERS if marker in text}


@pytest.fixture(scope="module")
def damaged_archive(tmp_path_factory, breast_dicom_dir) -> tuple[Path, dict[str, str | None]]:
    """The real BreastMNIST subset plus every kind of archive damage and the files whose damaged
    headers carry the markers, all listed as training rows; {path: the kind expected, or None}."""
    root = tmp_path_factory.mktemp("phi-console") / "data"
    shutil.copytree(breast_dicom_dir, root)
    expected: dict[str, str | None] = {}
    for name, (make, kind) in damaged.ARCHIVE_DAMAGE.items():
        (root / "train" / name).write_bytes(make())
        expected[f"train/{name}"] = kind.value if kind else None
    marker_kinds = {"invalid_uid.dcm": None, "patient_id_as_uid.dcm": None, "institution_as_ds.dcm": None,
                    "cut.dcm": "truncated", "bad_syntax.dcm": "unsupported transfer syntax", "frames_1A.dcm": "corrupt"}
    for name, data in damaged.marker_files().items():
        (root / "train" / f"marked_{name}").write_bytes(data)
        expected[f"train/marked_{name}"] = marker_kinds[name]
    manifest = pd.read_csv(root / "manifest.csv")
    extra = pd.DataFrame({"path": list(expected), "label": "benign", "split": "train"})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    return root, expected


@pytest.fixture(scope="module")
def cli_run(prefect_server, damaged_archive, tmp_path_factory):
    """`python -m flows.pipeline CONFIG` as an operator runs it (against the test Prefect server),
    its console captured; returns (completed process, config path, output root)."""
    root, _ = damaged_archive
    out = tmp_path_factory.mktemp("phi-console-run")
    config = write_config(out, root, model={"weights": "none"}, train={"epochs": 1, "batch_size": 32},
                          preprocess={"workers": 2}, export={"int8": False, "fp16": False},
                          evaluate={"bootstrap_samples": 100, "gradcam_images": 1})
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=1200, env=_environment(PREFECT_API_URL=PREFECT_API_URL.value()))
    return done, config, out


def test_a_cli_run_over_damaged_files_finishes_accounts_for_every_file_and_prints_no_identifier(
        cli_run, damaged_archive):
    done, _, out = cli_run
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "pipeline finished" in console  # the console was captured: the scan below can fail
    assert not _leaks(console)
    assert "Traceback" not in console  # expected rejects are one line each, tracebacks only at DEBUG

    _, expected = damaged_archive
    (run_dir,) = [p.parent for p in (out / "outputs" / "breast_ultrasound").glob("*/rejects.csv")]
    rejects = pd.read_csv(run_dir / "rejects.csv", dtype=str, keep_default_na=False)
    usable = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
    kinds = dict(zip(rejects["path"], rejects["kind"]))
    assert {path: kinds.get(path) for path in expected} == expected
    assert {path for path, kind in expected.items() if kind is None} <= set(usable["path"])
    assert usable["path"].nunique() + len(rejects) == 120 + len(expected)
    # ... and no marker in any file the run wrote (outputs, cache, MLflow store and artifacts).
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.onnx" for p in written)
    assert not {(str(p), marker) for p in written for marker in damaged.MARKERS if marker.encode() in p.read_bytes()}


def test_the_service_answers_damaged_marked_files_with_4xx_and_prints_no_identifier(cli_run, tmp_path):
    done, config, _ = cli_run
    assert done.returncode == 0
    port = free_port()
    log = tmp_path / "service.log"
    with open(log, "w") as console:
        service = subprocess.Popen([sys.executable, "-m", "serve", str(config), "--port", str(port)], cwd=REPO,
                                   stdout=console, stderr=subprocess.STDOUT, env=_environment())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert service.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not load the champion"
            time.sleep(0.5)
        statuses = {}
        bodies = {**damaged.marker_files(), **{name: make() for name, (make, _) in damaged.ARCHIVE_DAMAGE.items()}}
        for name, body in bodies.items():
            content_type = "image/png" if name.endswith(".png") else "application/dicom"
            statuses[name] = httpx.post(f"{url}/v1/predict", content=body, timeout=120,
                                        headers={"Content-Type": content_type}).status_code
    finally:
        service.terminate()
        service.wait(timeout=60)
    assert all(status == 200 or 400 <= status < 500 for status in statuses.values()), statuses
    assert statuses["invalid_uid.dcm"] == 200 and statuses["cut.dcm"] == 400
    console = log.read_text()
    assert "predict " in console and "rejected a application/dicom body" in console
    assert not _leaks(console)
    assert "Traceback" not in console
