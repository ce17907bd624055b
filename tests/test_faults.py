"""No single file stops a run: each class of damaged file issue 10 found, made from real files, through
ingest, preprocess (the process pool and in process; Dask in test_dask_preprocess.py), scoring and the
small-data guard. The service's answers are in test_serve.py, the console in test_phi_console.py."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from configs import DataConfig, FramePolicy, PreprocessConfig, TaskKind
from tasks import preprocess as pp
from tasks.decode import DecodeLimits, load_grey
from tasks.formats import ImageFormat, detect_format
from tasks.ingest import NotEnoughData, image_facts, ingest_dataset, read_dicom_header
from tasks.rejects import RejectKind, UnreadableImage, one_line
from tests import damaged

SALT = "fault-salt"

LISTED = damaged.ARCHIVE_DAMAGE
UNLISTED = {"stray_frames_1A.dcm": damaged.frames_not_a_number, "stray_meta_vr.dcm": damaged.unknown_vr_in_file_meta}


@pytest.fixture
def archive(tmp_path, breast_dicom_dir) -> tuple[Path, DataConfig]:
    """The real BreastMNIST subset with the damaged files among its training rows, and two
    damaged files under the root that the manifest does not list."""
    root = tmp_path / "archive"
    shutil.copytree(breast_dicom_dir, root)
    manifest = pd.read_csv(root / "manifest.csv")
    for name, (make, _) in LISTED.items():
        (root / "train" / name).write_bytes(make())
    for name, make in UNLISTED.items():
        (root / "train" / name).write_bytes(make())
    extra = pd.DataFrame({"path": [f"train/{name}" for name in LISTED], "label": "benign", "split": "train"})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    data = DataConfig(root=root, manifest=root / "manifest.csv", task=TaskKind.CLASSIFICATION,
                      label_names=["benign", "malignant"])
    return root, data


def test_every_damaged_file_is_one_reject_with_its_kind_and_the_run_goes_on(archive, tmp_path):
    root, data = archive
    ingested = ingest_dataset(data, seed=0, salt=SALT)
    config = PreprocessConfig(cache_dir=tmp_path / "cache", workers=2)  # the process pool
    prepared = pp.preprocess_dataset(ingested.manifest, root, config)
    rejects = prepared.rejects_with(ingested.rejects)

    kinds = dict(zip(rejects["path"], rejects["kind"]))
    expected = {f"train/{name}": kind.value for name, (_, kind) in LISTED.items() if kind}
    expected |= {f"train/{name}": RejectKind.NOT_IN_MANIFEST.value for name in UNLISTED}
    assert kinds == expected
    usable = set(prepared.manifest["path"])
    assert {f"train/{name}" for name, (_, kind) in LISTED.items() if kind is None} <= usable
    assert ingested.discovered == len(usable) + len(rejects) == 120 + len(LISTED) + len(UNLISTED)
    # One line each, naming no Python object.
    assert not rejects["reason"].str.contains("\n|object at 0x").any()
    # Rejected by ingest: with the manifest row (the header is line 1, the subset lines 2-121).
    rows = dict(zip(ingested.rejects["path"], ingested.rejects["rows"]))
    for line, name in enumerate(LISTED, start=122):
        assert rows.get(f"train/{name}", str(line)) == str(line)


def test_ingest_and_decoding_take_one_format_decision():
    # A TIFF header in the preamble of a real DICOM: both read it as DICOM. A PNG signature
    # before junk: both reject it the same way.
    dual = damaged.tiff_preamble_dicom()
    assert detect_format(dual) is ImageFormat.DICOM
    fmt = detect_format(dual)
    assert image_facts(dual, fmt, read_dicom_header(dual, fmt))["transfer_syntax"] == "Explicit VR Little Endian"
    assert load_grey(Path("dual"), data=dual)[1][0] == "decode:dicom(Explicit VR Little Endian)"
    junk = damaged.png_with_garbage_header()
    with pytest.raises(UnreadableImage) as at_ingest:
        image_facts(junk, detect_format(junk), None)
    with pytest.raises(UnreadableImage) as at_decode:
        load_grey(Path("junk.png"), data=junk)
    assert at_ingest.value.kind is at_decode.value.kind is RejectKind.TRUNCATED  # no IEND chunk at its end


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("a file over the pixel limit must not be decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # whatever an earlier call set
    bomb = damaged.png_bomb()
    assert len(bomb) < 150_000
    with pytest.raises(UnreadableImage) as info:
        load_grey(Path("bomb.png"), data=bomb)
    assert info.value.kind is RejectKind.TOO_LARGE
    assert info.value.detail == "more pixels than the limit of 50000000 (preprocess.max_pixels)"
    # Pillow's own guard refuses at the same limit (it refuses above twice its setting).
    assert 2 * Image.MAX_IMAGE_PIXELS == 50_000_000


def test_dicom_limits_are_checked_from_the_header():
    # A real 10-frame MR: ten frames decoded under `frames: all` is 10 x 64 x 64 pixels.
    path = Path(get_testdata_file("emri_small.dcm"))
    assert load_grey(path, frames=FramePolicy.ALL, limits=DecodeLimits(max_pixels=64 * 64 * 10, max_frames=10))
    with pytest.raises(UnreadableImage, match="64x64 x 10 frames pixels, more than the limit of 40959") as info:
        load_grey(path, frames=FramePolicy.ALL, limits=DecodeLimits(max_pixels=64 * 64 * 10 - 1, max_frames=10))
    assert info.value.kind is RejectKind.TOO_LARGE
    with pytest.raises(UnreadableImage, match="10 frames, more than the limit of 9 ") as info:
        load_grey(path, limits=DecodeLimits(max_pixels=10**9, max_frames=9))


def test_one_line_drops_object_reprs_and_line_breaks():
    assert one_line("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>\n  pylibjpeg: bad") == (
        "cannot identify image file pylibjpeg: bad")


def _kill_on(name: str):
    """preprocess_file, except that the worker decoding `name` is killed by SIGKILL, as the
    out-of-memory killer ends a process (fork: the workers inherit this patch)."""
    real = pp.preprocess_file

    def preprocess_file(path, config):
        if Path(path).name == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, config)
    return preprocess_file


def test_a_worker_killed_by_a_file_costs_that_file_a_reject_not_the_run(mixed_folder, tmp_path, monkeypatch):
    root, manifest = mixed_folder
    config = PreprocessConfig(cache_dir=tmp_path / "serial", workers=1)
    serial = pp.preprocess_dataset(manifest, root, config)
    monkeypatch.setattr(pp, "preprocess_file", _kill_on("SC_rgb.dcm"))
    survived = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 2,
                                                                               "cache_dir": tmp_path / "pool"}))
    kinds = dict(zip(survived.rejects["path"], survived.rejects["kind"]))
    assert kinds.pop("SC_rgb.dcm") == RejectKind.WORKER_DIED.value
    assert kinds == dict(zip(serial.rejects["path"], serial.rejects["kind"]))
    # Every other file has the serial run's pixels.
    others = serial.manifest["path"] != "SC_rgb.dcm"
    pd.testing.assert_frame_equal(survived.manifest, serial.manifest[others].reset_index(drop=True))
    np.testing.assert_array_equal(survived.images, serial.images[others.to_numpy()])


def test_a_class_with_fewer_patients_than_folds_is_named_with_the_rejects(tmp_path, breast_dicom_dir):
    root = tmp_path / "few"
    shutil.copytree(breast_dicom_dir, root)
    manifest = pd.read_csv(root / "manifest.csv").drop(columns="split")
    malignant = manifest.index[manifest["label"] == "malignant"]
    manifest = manifest.drop(malignant[4:])  # 4 malignant patients left
    (root / "gone.dcm").unlink(missing_ok=True)
    pd.concat([manifest, pd.DataFrame({"path": ["gone.dcm"], "label": ["benign"]})]).to_csv(
        root / "manifest.csv", index=False)
    data = DataConfig(root=root, manifest=root / "manifest.csv", task=TaskKind.CLASSIFICATION,
                      label_names=["benign", "malignant"])
    with pytest.raises(NotEnoughData, match=r"at least 7 patients per class .*: malignant: 4;") as info:
        ingest_dataset(data, seed=0, salt=SALT)
    # The rejects found so far travel with it, for the report the flow writes before it stops.
    rejects = info.value.rejects
    assert dict(zip(rejects["path"], rejects["kind"]))["gone.dcm"] == RejectKind.NOT_FOUND.value
