"""The input-domain check on real files: its scores against scikit-learn, in the ONNX graph
against PyTorch (every variant), and its header facts and reasons as data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from pydicom.data import get_testdata_file
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from configs import (DomainConfig, ExportConfig, Fit, NoveltyMethod, OutOfDomainGroup, OutOfDomainSource,
                     PreprocessConfig, TaskKind)
from tasks.champion import open_served_model
from tasks.domain import (DOMAIN_OUTPUT, DomainCheck, Fact, ReasonKind, conformal_rank, expected_false_rejection,
                          false_rejection_upper_bound, fit_domain, fit_novelty, image_features, judge,
                          novelty_scores, request_facts)
from tasks.domain_eval import PYDICOM_IMAGES, evaluate_domain, held_out_images, prepare_held_out
from tasks.export import (NORMALISED_FILE, SELF_CONTAINED_FILE, ServedDecode, open_session,
                          run_self_contained_outputs, serving_metadata)
from tasks.preprocess import preprocess_file
from tasks.transforms import PreprocessSpec
from tasks.variants import export_serving_models, half_precision, quantise_network, split_domain
from tests.conftest import SPEC, decoded_as_trained, header_record

CR_CHEST = "RG1_UNCR.dcm"
OTHER_SIZES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "JPEG2000.dcm")  # 128 to 1024 px, four modalities


def _split(dicom_dir: Path, split: str) -> list[Path]:
    manifest = pd.read_csv(dicom_dir / "manifest.csv")
    return [dicom_dir / rel for rel in manifest.loc[manifest["split"] == split, "path"]]


def _crops(paths) -> np.ndarray:
    return np.stack([SPEC.to_uint8(decoded_as_trained(p))[0] for p in paths])


@pytest.fixture(scope="module")
def breast_features(classifier, breast_dicom_dir):
    """Penultimate features of the real BreastMNIST ultrasound DICOMs, per split."""
    return {split: image_features(classifier, _crops(_split(breast_dicom_dir, split)))
            for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def breast_facts(breast_dicom_dir) -> pd.DataFrame:
    """Ingest's header columns for the training split, as the pipeline's manifest holds them."""
    return pd.DataFrame([header_record(p) for p in _split(breast_dicom_dir, "train")])


def test_mahalanobis_score_is_scikit_learns_ledoit_wolf_distance(breast_features):
    train, test = breast_features["train"], breast_features["test"]
    novelty, parameters = fit_novelty(train, NoveltyMethod.MAHALANOBIS)
    reference = LedoitWolf().fit(train.astype(np.float64))
    expected = np.sqrt(reference.mahalanobis(test.astype(np.float64)))
    assert novelty_scores(novelty, test) == pytest.approx(expected, rel=1e-4)
    assert parameters["shrinkage"] == pytest.approx(reference.shrinkage_)


def test_knn_score_is_the_cosine_distance_to_the_kth_neighbour(breast_features):
    train, test = breast_features["train"], breast_features["test"]
    novelty, parameters = fit_novelty(train, NoveltyMethod.KNN, k=3)
    distances = NearestNeighbors(n_neighbors=3, metric="cosine").fit(train).kneighbors(test)[0]
    assert parameters == {"k": 3}
    assert novelty_scores(novelty, test) == pytest.approx(distances[:, -1], abs=1e-5)


def test_threshold_is_the_validation_quantile_and_facts_come_from_the_training_headers(breast_features, breast_facts):
    fit = fit_domain(breast_features["train"], breast_features["val"], breast_facts, DomainConfig(quantile=0.9))
    n = len(fit.val_scores)
    # Split conformal's rank, ceil((n + 1) q): never below the empirical quantile, which on a small
    # split rejects more than 1 - q of in-domain images.
    rank = int(np.ceil((n + 1) * 0.9))
    assert rank < n and fit.check.threshold == np.sort(fit.val_scores)[rank - 1]
    assert fit.check.threshold >= np.quantile(fit.val_scores, 0.9)
    assert (fit.val_scores > fit.check.threshold).sum() == n - rank
    assert expected_false_rejection(n, 0.9) == (n + 1 - rank) / (n + 1) <= 0.1
    facts = fit.check.facts
    assert facts.seen == {Fact.FORMAT: ("dicom",), Fact.MODALITY: ("US",), Fact.PHOTOMETRIC: ("MONOCHROME2",),
                          Fact.SOP_CLASS: ("Ultrasound Image Storage",)}  # the sample has no BodyPartExamined
    assert facts.rows == facts.columns == (28, 28)
    assert DomainCheck.from_metadata(fit.check.to_metadata()) == fit.check
    assert DomainCheck.from_metadata({}) is None  # a model exported before the check


@pytest.mark.parametrize(("n", "quantile"), [(78, 0.99), (200, 0.9)])
def test_one_splits_threshold_keeps_false_rejection_under_the_upper_bound_as_often_as_its_confidence(n, quantile):
    """Draw many validation splits of uniform in-domain scores: the rate above each split's conformal
    threshold (1 - the threshold, for uniform scores) exceeds the bound in 1 - confidence of them."""
    scores = np.sort(np.random.default_rng(0).random((20_000, n)), axis=1)
    rates = 1 - scores[:, conformal_rank(n, quantile) - 1]
    bound = false_rejection_upper_bound(n, quantile, 0.95)
    assert rates.mean() == pytest.approx(expected_false_rejection(n, quantile), rel=0.03)
    assert (rates > bound).mean() == pytest.approx(0.05, abs=0.005)
    assert bound > expected_false_rejection(n, quantile)


def test_a_chest_cr_is_outside_a_breast_ultrasound_domain_for_reasons_given_as_data(breast_features, breast_facts,
                                                                                   breast_dicom_dir):
    check = fit_domain(breast_features["train"], breast_features["val"], breast_facts, DomainConfig()).check
    cr = request_facts(Path(get_testdata_file(CR_CHEST)).read_bytes())
    verdict = judge(cr, score=check.threshold / 2, check=check)
    assert verdict.in_domain is False
    assert [(r.kind, r.fact, r.value) for r in verdict.reasons] == [
        (ReasonKind.UNSEEN_VALUE, Fact.MODALITY, "CR"), (ReasonKind.UNSEEN_VALUE, Fact.PHOTOMETRIC, "MONOCHROME1"),
        (ReasonKind.UNSEEN_VALUE, Fact.SOP_CLASS, "Computed Radiography Image Storage"),
        (ReasonKind.SIZE_OUT_OF_RANGE, None, "1955x1841")]
    assert verdict.messages()[0] == "Modality CR not seen in training (US)"
    assert verdict.messages()[3] == "image size 1955x1841 outside the training range 28-28 rows x 28-28 columns"
    reason = verdict.as_json()["domain_reasons"][0]
    assert reason == {"kind": "unseen_value", "fact": "modality", "value": "CR", "expected": ["US"],
                      "message": "Modality CR not seen in training (US)"}

    # Its own kind of image passes the header check; only the novelty score can flag it.
    own = request_facts(_split(breast_dicom_dir, "test")[0].read_bytes())
    assert judge(own, check.threshold, check).in_domain is True
    novel = judge(own, 2 * check.threshold, check)
    assert [r.kind for r in novel.reasons] == [ReasonKind.NOVELTY_ABOVE_THRESHOLD]
    assert novel.messages() == [f"image novelty {2 * check.threshold:.3g} above threshold {check.threshold:.3g}"]

    # A PNG of the same pixels: another file format; its DICOM-only facts are not compared.
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    reasons = judge(request_facts(png.getvalue()), 0.0, check).reasons
    assert [(r.kind, r.fact) for r in reasons] == [(ReasonKind.UNSEEN_VALUE, Fact.FORMAT)]
    assert reasons[0].text() == "file format PNG/JPEG not seen in training (DICOM)"


def test_graph_domain_score_equals_pytorch_in_every_variant(tmp_path, classifier, breast_features, breast_facts,
                                                            breast_dicom_dir):
    """The fp32 graphs, int8 and fp16 all output domain_score; the parity gate compares it with
    the PyTorch novelty module on real images of many sizes, and it is in the served answer."""
    fit = fit_domain(breast_features["train"], breast_features["val"], breast_facts, DomainConfig())
    paths = _split(breast_dicom_dir, "test")[:12] + [Path(get_testdata_file(n)) for n in OTHER_SIZES]
    greys = [decoded_as_trained(p) for p in paths]
    metadata = serving_metadata(task=TaskKind.CLASSIFICATION, label_names=["benign", "malignant"], positive_index=1,
                                operating_threshold=None, spec=SPEC, metrics={}, training_data="0",
                                weights_name="none", weights_sha256="none", model_name="t") | fit.check.to_metadata()
    calibration = _crops(_split(breast_dicom_dir, "train")[:32])
    models = export_serving_models(classifier, tmp_path, metadata, ExportConfig(int8_calibration_methods=["minmax"]),
                                   train_crops=calibration, val_crops=_crops(_split(breast_dicom_dir, "val")[:16]),
                                   test_crops=_crops(paths), test_greys=greys, test_targets=np.zeros(len(paths)), threshold=0.5,
                                   positive_index=1, novelty=fit.novelty, domain_threshold=fit.check.threshold)
    reports = {r.graph: r for r in models.parity}
    assert set(reports) == {"normalised", "self-contained", "int8", "fp16"}
    for graph in ("normalised", "self-contained"):
        assert reports[graph].domain_max_rel_diff <= 1e-3 and reports[graph].passed
    assert reports["fp16"].domain_max_rel_diff <= ExportConfig().variant_domain_max_rel_diff
    assert reports["int8"].domain_max_rel_diff is not None  # measured; kept or dropped by it

    # The self-contained file's own output, read directly, is PyTorch's score for the same crops.
    session = open_session(tmp_path / SELF_CONTAINED_FILE)
    scores = run_self_contained_outputs(session, greys)[DOMAIN_OUTPUT]
    expected = novelty_scores(fit.novelty, image_features(classifier, _crops(paths)))
    assert scores == pytest.approx(expected, rel=1e-4)
    # The variants leave the domain head in float32 (an 8-bit or fp16 distance would lose it).
    for variant in (quantise_network(tmp_path / NORMALISED_FILE, tmp_path / "int8_network.onnx", calibration,
                                     SPEC, "minmax", reduce_range=False),
                    half_precision(tmp_path / NORMALISED_FILE)):
        network = onnx.load(variant) if isinstance(variant, Path) else variant
        _, head, features = split_domain(network)
        kinds = {t.data_type for t in head.graph.initializer}
        assert onnx.TensorProto.FLOAT in kinds and not kinds & {onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8}
        assert {n.op_type for n in head.graph.node} - {"Cast"} == {"Sub", "MatMul", "Pow", "ReduceSum", "Sqrt"}
        casts = [n for n in head.graph.node if n.op_type == "Cast"]  # fp16's features, to float32
        assert all(onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.FLOAT for n in casts)
        assert [o.type.tensor_type.elem_type for o in network.graph.output] == [onnx.TensorProto.FLOAT] * 2
    # What the service answers carries the same score and the verdict at the shipped threshold.
    served = open_served_model("t", "1", "fp32", tmp_path / SELF_CONTAINED_FILE)
    prepared = [served.prepare(p, p.read_bytes()) for p in paths]
    answers = served.predict([one.crop for one in prepared], [one.facts for one in prepared])
    assert [a.body["domain_score"] for a in answers] == pytest.approx(expected, rel=1e-4)
    assert all(a.domain.in_domain is False for a in answers[-len(OTHER_SIZES):])  # CT, MR, colour US, NM


def test_held_out_images_by_modality_and_the_evaluation_report(breast_features, breast_facts, classifier,
                                                               breast_dicom_dir):
    sources = [OutOfDomainSource(group=OutOfDomainGroup.OTHER_MODALITY, pydicom=["CR"]),
               OutOfDomainSource(group=OutOfDomainGroup.SAME_MODALITY_OTHER_ANATOMY, pydicom=["CR"],
                                 body_parts=["EXTREMITY"]),
               OutOfDomainSource(group=OutOfDomainGroup.OTHER_MODALITY, folder=Path("/nonexistent/nih"))]
    images, skipped = held_out_images(sources, seed=0)
    assert [(i.kind, i.group) for i in images] == [("CR", OutOfDomainGroup.OTHER_MODALITY)] * 2 + [
        ("CR", OutOfDomainGroup.SAME_MODALITY_OTHER_ANATOMY)]
    assert skipped == ["other_modality: folder /nonexistent/nih is absent"]
    assert len(PYDICOM_IMAGES) == len(set(PYDICOM_IMAGES))

    fit = fit_domain(breast_features["train"], breast_features["val"], breast_facts, DomainConfig())
    held = prepare_held_out(images, ServedDecode.for_training(PreprocessConfig()), SPEC)
    scores = novelty_scores(fit.novelty, image_features(classifier, held.crops))
    test_scores = novelty_scores(fit.novelty, breast_features["test"])
    test_facts = [request_facts(p.read_bytes()) for p in _split(breast_dicom_dir, "test")]
    result = evaluate_domain(fit.check, len(breast_features["val"]), test_scores, test_facts, held, scores,
                             bootstrap_samples=200, skipped=skipped)
    assert [g.group for g in result.groups] == [OutOfDomainGroup.OTHER_MODALITY,
                                                OutOfDomainGroup.SAME_MODALITY_OTHER_ANATOMY]
    other = result.groups[0]
    expected_auroc = np.mean([(s > test_scores).mean() + 0.5 * (s == test_scores).mean() for s in scores[:2]])
    assert other.images == 2 and other.auroc == pytest.approx(expected_auroc)
    assert other.interval[0] <= other.auroc <= other.interval[1] and other.flagged == 1.0  # Modality CR
    assert result.false_rejection_novelty == pytest.approx((test_scores > fit.check.threshold).mean())
    # The false-rejection rate with its exact binomial interval: k of n flagged.
    flagged = round(result.false_rejection * len(test_scores))
    low, high = result.false_rejection_interval
    assert low <= result.false_rejection <= high and 0 < high - low < 1
    n = len(test_scores)
    assert low == (0.0 if flagged == 0 else pytest.approx(stats.beta.ppf(0.025, flagged, n - flagged + 1)))
    assert high == pytest.approx(stats.beta.ppf(0.975, flagged + 1, n - flagged))
    metrics = result.mlflow_metrics()
    assert metrics["domain_auroc_other_modality"] == other.auroc and "domain_threshold" in metrics
    body = result.body()
    n = len(breast_features["val"])  # fewer than the 99 a 0.99 quantile needs: the largest score
    assert fit.check.threshold == fit.val_scores.max() and n < 99
    assert f"validation score {n} of {n} in ascending order" in body
    upper = 1 - 0.05 ** (1 / n)  # the largest of n scores: the rate above it is Beta(1, n)
    assert f"at most {1 / (n + 1):.1%} on average over validation splits, and at most {upper:.1%} with 95% " in body
    assert (f"(training-conditional bound). {n} validation images cannot support the 0.99 quantile "
            "(that needs 99)") in body
    assert metrics["domain_expected_false_rejection_bound"] == 1 / (n + 1)
    assert metrics["domain_false_rejection_upper_bound"] == pytest.approx(upper)
    assert f"[{low:.1%}, {high:.1%}] (95% exact binomial interval" in body
    assert metrics["domain_test_false_rejection_rate_ci_high"] == high
    assert "| other modality | 2 |" in body and "Skipped: other_modality: folder /nonexistent/nih is absent." in body


@pytest.mark.parametrize("fit", list(Fit))
def test_held_out_images_are_preprocessed_as_training_preprocesses(tmp_path, fit):
    """The domain evaluation's held-out crops are the preprocess stage's crops of the same file,
    under either fit: the novelty it reports is measured on what the model would see."""
    config = PreprocessConfig(fit=fit, cache_dir=tmp_path / "cache")
    images, _ = held_out_images([OutOfDomainSource(group=OutOfDomainGroup.OTHER_MODALITY, pydicom=["CR"])], seed=0)
    held = prepare_held_out(images, ServedDecode.for_training(config), PreprocessSpec.from_config(config))
    paths = [Path(get_testdata_file(name)) for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm")]  # the CR files, in order
    assert [image.data for image in held.images] == [path.read_bytes() for path in paths]
    expected = np.stack([preprocess_file(path, config).image for path in paths])
    np.testing.assert_array_equal(held.crops, expected)
    if fit is Fit.PAD:  # RG1's long side (1955 rows) fills the crop, its columns are padded with air
        assert (held.crops[0][:, 0] == 0).all() and (held.crops[0][:, -1] == 0).all()
