"""The inference service, for real: uvicorn on loopback, a champion in an MLflow SQLite
store, ONNX Runtime, and real DICOM files from pydicom-data (and broken ones made from them)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
import numpy as np
import onnx
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from configs import DomainPolicy, ServeConfig
from sample_data.breastmnist import BUNDLED_NPZ, ultrasound_dicom
from serve.app import API_KEY_HEADER, REQUEST_NAME, STATUS_FOR_KIND, Service, Settings, create_app, session_threads
from serve.batching import MicroBatcher
from tasks.champion import open_served_model
from tasks.decode import load_grey
from tasks.domain import request_facts
from tasks.export import NORMALISED_FILE, export_self_contained, read_metadata
from tasks.preprocess import resolve_workers
from tasks.register import register_model, tracking_run
from tasks.rejects import RejectKind
from tasks.variants import quantise_int8
from tests.conftest import SPEC, decoded_as_trained, evaluated_outputs, register_version
from tests import damaged
from tests.live_server import LiveServer

API_KEY = "test-key-not-a-secret"
BODY_LIMIT = 8 * 1024 * 1024
DICOM = {"Content-Type": "application/dicom", API_KEY_HEADER: API_KEY}


class Captured(logging.Handler):
    """Every log record of the process while the service runs (pytest may run with -p no:logging)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def service(champion_registry):
    config, _, _ = champion_registry
    settings = Settings(config.registry.tracking_uri, config.registry.model_name,
                        ServeConfig(max_body_bytes=BODY_LIMIT, batch_window_ms=50, reload_seconds=0.5),
                        api_key=API_KEY)
    logs = Captured()
    logging.getLogger().addHandler(logs)
    logging.getLogger("medxfer.serve").setLevel(logging.DEBUG)
    logging.getLogger("serve").setLevel(logging.DEBUG)
    server = LiveServer(create_app(settings))
    yield server, logs
    server.stop()
    logging.getLogger().removeHandler(logs)


def post(server, data: bytes, headers=DICOM) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/predict", content=data, headers=headers, timeout=120)


def dicom_bytes(name: str) -> bytes:
    return open(get_testdata_file(name), "rb").read()


def test_health_and_readiness_report_model_and_provider(service):
    server, _ = service
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == {"name": "serve-test", "version": "1", "variant": "fp32",
                                     "provider": "CPUExecutionProvider"}


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "CT_small.dcm", "JPEG2000.dcm", "US1_J2KR.dcm"])
def test_real_dicom_gets_the_models_own_prediction(service, champion_registry, name):
    server, _ = service
    response = post(server, dicom_bytes(name))
    assert response.status_code == 200, response.text
    body = response.json()
    # The same file decoded and preprocessed as in evaluation (RG1_J2KR at half resolution,
    # as preprocessing decodes it), through the normalised graph.
    expected = evaluated_outputs(champion_registry[2], [decoded_as_trained(get_testdata_file(name))])[0]
    assert body["probabilities"] == pytest.approx({"benign": expected[0], "malignant": expected[1]}, abs=1e-6)
    assert body["label"] == ("malignant" if expected[1] >= 0.5 else "benign")
    assert body["threshold"] == 0.5 and body["positive_label"] == "malignant"
    assert body["model"]["name"] == "serve-test" and body["model"]["provider"] == "CPUExecutionProvider"


def _breast_train_image(breast_dicom_dir) -> bytes:
    """One of the champion's own training images (its domain check was fitted on them)."""
    manifest = pd.read_csv(breast_dicom_dir / "manifest.csv")
    return (breast_dicom_dir / manifest.loc[manifest["split"] == "train", "path"].iloc[0]).read_bytes()


def test_every_answer_says_whether_its_input_is_in_the_training_domain(service, breast_dicom_dir):
    """The champion was trained on breast ultrasound: a chest CR is answered, flagged, with the
    reasons as data; its own kind of image is answered in domain."""
    server, _ = service
    body = post(server, dicom_bytes("RG1_UNCR.dcm")).json()
    assert body["in_domain"] is False and body["label"] in ("benign", "malignant")
    reasons = body["domain_reasons"]
    assert reasons[0] == {"kind": "unseen_value", "fact": "modality", "value": "CR", "expected": ["US"],
                          "message": "Modality CR not seen in training (US)"}
    assert {r["kind"] for r in reasons} >= {"unseen_value", "size_out_of_range"}
    assert isinstance(body["domain_score"], float)

    own = post(server, _breast_train_image(breast_dicom_dir)).json()
    assert own["in_domain"] is True and own["domain_reasons"] == []


def test_refuse_policy_answers_422_with_the_reasons(champion_registry, breast_dicom_dir):
    config, _, _ = champion_registry
    settings = Settings(config.registry.tracking_uri, config.registry.model_name, ServeConfig(), api_key=API_KEY,
                        domain_policy=DomainPolicy.REFUSE)
    server = LiveServer(create_app(settings))
    try:
        refused = post(server, dicom_bytes("RG1_UNCR.dcm"))
        assert refused.status_code == STATUS_FOR_KIND[RejectKind.OUT_OF_DOMAIN] == 422
        detail = refused.json()
        assert (detail["kind"], detail["detail"]) == ("out of domain", "the input is outside the model's training domain")
        assert detail["in_domain"] is False and "label" not in detail and detail["model"]["name"] == "serve-test"
        assert [r["message"] for r in detail["domain_reasons"]][:3] == [
            "Modality CR not seen in training (US)",
            "PhotometricInterpretation MONOCHROME1 not seen in training (MONOCHROME2)",
            "SOP class Computed Radiography Image Storage not seen in training (Ultrasound Image Storage)"]
        answered = post(server, _breast_train_image(breast_dicom_dir))
        assert answered.status_code == 200 and answered.json()["in_domain"] is True
    finally:
        server.stop()


def test_png_and_jpeg_bodies(service):
    server, _ = service
    grey = load_grey(get_testdata_file("CT_small.dcm"))[0]
    for fmt, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        buffer = io.BytesIO()
        Image.fromarray(np.round(grey * 255).astype(np.uint8)).save(buffer, fmt)
        response = post(server, buffer.getvalue(), {"Content-Type": content_type, API_KEY_HEADER: API_KEY})
        assert response.status_code == 200, response.text
        assert set(response.json()["probabilities"]) == {"benign", "malignant"}


def unsupported_syntax_dicom(tmp_path) -> bytes:
    """CT_small re-labelled as MPEG-2 video: a real DICOM transfer syntax nothing here decodes."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "mpeg2.dcm", enforce_file_format=True)
    return (tmp_path / "mpeg2.dcm").read_bytes()


def no_pixels_dicom(tmp_path) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    return (tmp_path / "nopixels.dcm").read_bytes()


def sliver_png() -> bytes:
    """A 10x128 strip of a real CT slice: too thin to scale up to the model's size."""
    grey = load_grey(get_testdata_file("CT_small.dcm"))[0][:10]
    buffer = io.BytesIO()
    Image.fromarray(np.round(grey * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_input_gets_a_clear_4xx(service, tmp_path):
    server, _ = service
    cases = [
        (sliver_png(), {"Content-Type": "image/png", API_KEY_HEADER: API_KEY}, 422, "aspect ratio over 8:1"),
        (dicom_bytes("CT_small.dcm")[:-2000], DICOM, 400, "of the 32768 bytes its header declares"),
        (b"patient notes, not an image", DICOM, 400, "not a DICOM, PNG or JPEG file"),
        (no_pixels_dicom(tmp_path), DICOM, 422, "DICOM has no pixel data"),
        (unsupported_syntax_dicom(tmp_path), DICOM, 415, "no decoder for transfer syntax MPEG2"),
        (dicom_bytes("RG1_UNCR.dcm") + b"\0" * (BODY_LIMIT - 7200056 + 1), DICOM, 413, "8388608-byte limit"),
        (b"", DICOM, 400, "empty body"),
        (dicom_bytes("CT_small.dcm"), {"Content-Type": "text/plain", API_KEY_HEADER: API_KEY}, 415,
         "Content-Type must be one of application/dicom, image/png, image/jpeg"),
        (dicom_bytes("CT_small.dcm"), {"Content-Type": "application/dicom"}, 401, "X-API-Key"),
        (dicom_bytes("CT_small.dcm"), {"Content-Type": "application/dicom", API_KEY_HEADER: "wrong"}, 401,
         "X-API-Key"),
    ]
    for data, headers, status, message in cases:
        response = post(server, data, headers)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # still up


# Each damaged real file issue 10 found once answered 500, with the kind and status it gets now.
DAMAGED_BODIES = {
    "frames_1A": (damaged.frames_not_a_number, "corrupt", 400),
    "syntax_two_values": (damaged.damaged_transfer_syntax, "unsupported transfer syntax", 415),
    "syntax_unknown": (damaged.unknown_transfer_syntax, "unsupported transfer syntax", 415),
    "syntax_mislabelled": (damaged.mislabelled_transfer_syntax, "unsupported transfer syntax", 415),
    "palette_without_lut": (damaged.palette_without_lookup_table, "corrupt", 400),
    "slope_not_a_number": (damaged.rescale_slope_not_a_number, "corrupt", 400),
    "jpeg_12_bit": (lambda: damaged.real("JPEG-lossy.dcm"), "decoder limitation", 415),
    "cut_j2k": (lambda: damaged.cut(damaged.real("emri_small_jpeg_2k_lossless.dcm"), 0.5), "truncated", 400),
    # Read only by the domain check's header facts: a 500 while they were read outside the boundary.
    "sop_class_vr": (damaged.unknown_vr_in_sop_class, "corrupt", 400),
}


@pytest.mark.parametrize("name", DAMAGED_BODIES)
def test_damaged_real_files_get_the_status_of_their_kind(service, name):
    server, _ = service
    make, kind, status = DAMAGED_BODIES[name]
    response = post(server, make())
    assert (response.status_code, response.json()["kind"]) == (status, kind), response.text
    detail = response.json()["detail"]
    assert detail.startswith("cannot read the application/dicom body: ")
    assert "\n" not in detail and "object at 0x" not in detail


def test_a_decompression_bomb_gets_413_without_being_decoded(service):
    server, _ = service
    response = post(server, damaged.png_bomb(), {"Content-Type": "image/png", API_KEY_HEADER: API_KEY})
    assert (response.status_code, response.json()["kind"]) == (413, "too large")


def test_a_burst_of_bad_and_good_bodies_on_kept_alive_connections_loses_no_good_one(service):
    """A 500 made uvicorn close the keep-alive connection, failing other clients' requests on it."""
    server, _ = service
    good = dicom_bytes("CT_small.dcm")
    bad = [make() for make, _, _ in DAMAGED_BODIES.values()]
    bodies = [(good, True) if i % 3 else (bad[i % len(bad)], False) for i in range(150)]
    with httpx.Client(headers=DICOM, timeout=120, limits=httpx.Limits(max_connections=6)) as client:
        def send(body_and_good: tuple[bytes, bool]) -> tuple[int, bool]:
            body, is_good = body_and_good
            return client.post(f"{server.url}/v1/predict", content=body).status_code, is_good
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(send, bodies))
    assert {status for status, is_good in results if is_good} == {200}
    assert all(400 <= status < 500 for status, is_good in results if not is_good)


def breastmnist_bodies() -> list[tuple[bytes, str]]:
    """Two real BreastMNIST test images (28x28 ultrasound): one as PNG, one as DICOM."""
    pixels = np.load(BUNDLED_NPZ)["test_images"][:2]
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, "PNG")
    dicom = io.BytesIO()
    ultrasound_dicom(pixels[1], 1).save_as(dicom, enforce_file_format=True)
    return [(png.getvalue(), "image/png"), (dicom.getvalue(), "application/dicom")]


# Real images of 7 different sizes, from 28x28 to 1955x1841 (CR).
MIXED_DICOMS = ("MR_small.dcm", "CT_small.dcm", "US1_J2KR.dcm", "JPEG2000.dcm", "MR2_J2KR.dcm", "RG1_UNCR.dcm")


@pytest.fixture
def wide_window_service(champion_registry):
    """The service with a 500 ms batch window, so that concurrent requests meet in a batch
    however long their bodies take to decode on a busy machine."""
    config, _, _ = champion_registry
    settings = Settings(config.registry.tracking_uri, config.registry.model_name,
                        ServeConfig(max_body_bytes=BODY_LIMIT, batch_window_ms=500, max_batch=16), api_key=None)
    server = LiveServer(create_app(settings))
    yield server
    server.stop()


def test_images_of_different_sizes_share_batches_and_keep_their_answers(wide_window_service):
    server = wide_window_service
    bodies = [(dicom_bytes(name), "application/dicom") for name in MIXED_DICOMS] + breastmnist_bodies()
    sizes = {load_grey(REQUEST_NAME, data=body)[0].shape for body, _ in bodies}
    assert len(sizes) == 7

    def send(body_and_type: tuple[bytes, str]) -> dict:
        body, content_type = body_and_type
        response = post(server, body, {"Content-Type": content_type})
        assert response.status_code == 200, response.text
        return response.json()

    singles = [send(body) for body in bodies]  # one at a time: each runs in a batch of its own
    before = httpx.get(f"{server.url}/readyz").json()
    with ThreadPoolExecutor(2 * len(bodies)) as pool:
        answers = list(pool.map(send, bodies * 2))  # every image twice, all at once
    after = httpx.get(f"{server.url}/readyz").json()

    # Fewer network calls than distinct sizes: some call held images of different sizes,
    # which running each size apart could not do.
    calls = after["network_calls"] - before["network_calls"]
    assert calls < len(sizes)
    assert after["batches"] - before["batches"] == calls
    # Each concurrent answer is the image's single-request answer; 1e-6 leaves room for
    # float32 sums that ONNX Runtime may block differently for another batch size.
    for answer, single in zip(answers, singles * 2):
        assert answer["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
        assert {k: v for k, v in answer.items() if k not in ("probabilities", "positive_probability")} == \
               {k: v for k, v in single.items() if k not in ("probabilities", "positive_probability")}


def test_requests_are_decoded_with_the_training_voi_window(champion_registry, tmp_path):
    """A model trained on a file's second header window must be served that window too."""
    proto = onnx.load(champion_registry[2])
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    metadata["decode"] = json.dumps({"voi_window": 1, "frame": "middle"})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, tmp_path / "model.onnx")
    model = open_served_model("serve-test", "2", "fp32", tmp_path / "model.onnx")
    path = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")  # header windows 450/790, then 200/443
    served = model.decode(path, open(path, "rb").read())
    np.testing.assert_array_equal(served, load_grey(path, voi_window=1)[0])
    assert np.abs(served - load_grey(path, voi_window=0)[0]).mean() > 0.01


@pytest.mark.parametrize(("name", "bare"), [("CT_small.dcm", False), ("US1_J2KR.dcm", False), ("MR_small.dcm", True)])
def test_a_request_parsed_once_gets_the_facts_and_pixels_of_separate_reads(champion_registry, name, bare):
    """prepare parses a body's header once for its facts and its decode: the same answers as
    reading each apart (a bare data set, with no file meta, is one whose transfer syntax the
    decode infers and writes into the parsed header)."""
    _, _, full = champion_registry
    model = open_served_model("serve-test", "1", "fp32", full)
    body = damaged.without_preamble_and_meta(dicom_bytes(name)) if bare else dicom_bytes(name)
    prepared = model.prepare(REQUEST_NAME, body)
    assert prepared.facts == request_facts(body)
    np.testing.assert_array_equal(prepared.crop, model.spec.to_uint8(model.decode(REQUEST_NAME, body))[0])


def test_the_served_session_waits_without_spinning(champion_registry):
    """Requests are decoded beside a running batch: the served session's threads must not spin
    on the cores those decodes need (benchmarks/RESULTS.md, issue 16, the service)."""
    _, _, full = champion_registry
    options = open_served_model("serve-test", "1", "fp32", full).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_dynamic_int8_file_still_runs_one_image_per_call(champion_registry, tmp_path):
    """int8 files exported before static quantisation are dynamic: their activation scale is
    taken over the whole input tensor, so served batched an image's probabilities would
    change with its batch-mates. Such a file runs one image per network call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, _, full = champion_registry
    network = tmp_path / "network.onnx"
    proto = onnx.load(full.parent / NORMALISED_FILE)
    del proto.graph.value_info[:]  # the exporter's shapes trip the quantiser's shape inference
    onnx.save(proto, network)
    quantize_dynamic(network, tmp_path / "network_int8.onnx", weight_type=QuantType.QUInt8)
    dynamic = export_self_contained(tmp_path / "network_int8.onnx", tmp_path / "model_int8.onnx", read_metadata(full))
    model = open_served_model("serve-test", "1", "int8", dynamic)
    assert model.per_image
    crops = [model.prepare(REQUEST_NAME, dicom_bytes(name)).crop for name in MIXED_DICOMS]
    together = model.predict(crops)
    assert model.network_calls == len(crops)
    alone = [model.predict([crop])[0] for crop in crops]
    assert [p.body for p in together] == [p.body for p in alone]


def test_static_int8_requests_share_batches_and_keep_their_answers(champion_registry, tmp_path):
    """Static int8 has calibrated, fixed scales: the service batches int8 requests as it does
    fp32 ones, and each answer is the image's single-request answer."""
    config, model, full = champion_registry
    bodies = [(dicom_bytes(name), "application/dicom") for name in MIXED_DICOMS] + breastmnist_bodies()
    greys = [load_grey(REQUEST_NAME, data=body)[0] for body, _ in bodies]
    crops = np.stack([SPEC.to_uint8(grey)[0] for grey in greys])
    int8, _ = quantise_int8(full.parent / NORMALISED_FILE, tmp_path / "model_int8.onnx",
                            read_metadata(full), calibration_crops=crops, selection_crops=crops,
                            methods=("minmax",))
    assert not open_served_model("serve-test", "1", "int8", int8).per_image
    registry = config.model_copy(update={"registry": config.registry.model_copy(update={
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    served_full = tmp_path / "model.onnx"
    served_full.write_bytes(full.read_bytes())
    with tracking_run(registry, "int8-test") as run_id:
        mlflow.log_metric("test_roc_auc", 0.7)
        register_model(registry, run_id, model, served_full, "roc_auc", True, torch.zeros(1, 3, 224, 224),
                       onnx_variants={"int8": int8})
    settings = Settings(registry.registry.tracking_uri, registry.registry.model_name,
                        ServeConfig(variant="int8", batch_window_ms=500, max_batch=16), api_key=None)
    server = LiveServer(create_app(settings))
    try:
        def send(body_and_type: tuple[bytes, str]) -> dict:
            response = post(server, body_and_type[0], {"Content-Type": body_and_type[1]})
            assert response.status_code == 200, response.text
            return response.json()

        singles = [send(body) for body in bodies]
        before = httpx.get(f"{server.url}/readyz").json()
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(send, bodies))
        after = httpx.get(f"{server.url}/readyz").json()
    finally:
        server.stop()
    assert after["model"]["variant"] == "int8"
    assert after["network_calls"] - before["network_calls"] < len(bodies)  # some calls held several images
    for answer, single in zip(answers, singles):
        assert answer["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
        assert answer["label"] == single["label"]
        # The float32 domain head behind the int8 network: its score is batch-independent too.
        assert answer["domain_score"] == pytest.approx(single["domain_score"], rel=1e-5)
        assert answer["in_domain"] == single["in_domain"] and answer["domain_reasons"] == single["domain_reasons"]


def test_micro_batcher_runs_waiting_items_together():
    calls = []

    def run(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, window_s=0.2)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 50]
    assert [len(c) for c in calls] == [4, 2]


@pytest.mark.parametrize("lanes", [1, 2])
def test_micro_batcher_runs_up_to_its_lanes_of_full_batches_at_once(lanes):
    """Each lane runs a full batch while the next lane gathers; one lane, one batch at a time."""
    running, most_at_once, sizes = 0, 0, []
    lock = threading.Lock()

    def run(items):
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
            sizes.append(len(items))
        time.sleep(0.5)  # long beside the gathering of the next batch, whose items are all queued
        with lock:
            running -= 1
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, window_s=0.2, lanes=lanes)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [10 * i for i in range(8)]
    assert sizes == [4, 4] and most_at_once == lanes


@pytest.mark.parametrize(("lanes", "cores", "on_gpu", "expected"), [
    (1, 2, False, None), (2, 2, False, 1), (2, 8, False, 4), (3, 2, False, 1), (1, 16, True, None)])
def test_concurrent_batches_share_the_cpu_cores_and_leave_a_gpu_session_its_default(lanes, cores, on_gpu, expected):
    assert session_threads(lanes, cores, on_gpu) == expected


def test_the_service_runs_its_configured_batches_at_once_each_on_its_share_of_the_cores(champion_registry):
    config, _, _ = champion_registry
    settings = Settings(config.registry.tracking_uri, config.registry.model_name,
                        ServeConfig(concurrent_batches=2), api_key=None)
    server = LiveServer(create_app(settings))
    try:
        assert httpx.get(f"{server.url}/readyz").json()["concurrent_batches"] == 2
        options = server.app.state.service.model.session.get_session_options()
        assert options.intra_op_num_threads == max(1, resolve_workers(None) // 2)
    finally:
        server.stop()


def test_a_batch_answers_each_request_with_the_model_that_cropped_it(champion_registry):
    """Requests decoded and cropped before a reload meet requests after it in one batch:
    each runs on its own model's network, never on the other's."""
    _, _, full = champion_registry
    old, new = (open_served_model("serve-test", version, "fp32", full) for version in ("1", "2"))
    bodies = [dicom_bytes(name) for name in ("CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm")]
    requests = [(model, model.prepare(REQUEST_NAME, body).crop, None) for model, body in zip((old, new, old), bodies)]
    answers = Service._predict(requests)
    assert [model.version for _, model in answers] == ["1", "2", "1"]
    assert (old.network_calls, new.network_calls) == (1, 1)  # one call per model, both old requests in one
    for (prediction, _), (_, crop, _) in zip(answers, requests):  # same weights: each is the one-image answer
        alone = old.predict([crop])[0].body
        assert prediction.body["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-6)
        assert prediction.body["label"] == alone["label"]


def test_no_patient_data_in_logs(service):
    _, logs = service
    assert any("predict serve-test v1" in m for m in logs.messages)
    for name in ("RG1_UNCR.dcm", "CT_small.dcm", "JPEG2000.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        for value in (str(ds.PatientName), str(ds.PatientID)):
            assert not any(value in message for message in logs.messages), value


def test_reloads_when_champion_moves_without_dropping_requests(service, champion_registry):
    """Last in this module: it moves the registry's champion to version 2."""
    server, _ = service
    config, model, full = champion_registry
    data = dicom_bytes("CT_small.dcm")
    statuses: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        traffic = pool.submit(lambda: [statuses.append(post(server, data).status_code) for _ in range(12)])
        registration = register_version(config, model, full, auc=0.90)
        assert registration.is_champion and registration.version == "2"
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/readyz").json()["model"]["version"] != "2":
            assert time.monotonic() < deadline, "the service did not load the new champion"
            time.sleep(0.2)
        traffic.result()
    assert statuses and set(statuses) == {200}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["reloads"] == 1 and ready["load_error"] is None
    assert post(server, data).json()["model"]["version"] == "2"
