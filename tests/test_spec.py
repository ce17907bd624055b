"""The preprocessing spec is the one definition every consumer reads: change one of its values and the
Python transform, the ONNX graph, the metadata a registered file carries (and the service rebuilds the
spec from), the provenance, the model card's wording and the cache key all follow, each as far as the
value concerns it, and the graph and the service still agree with the transform."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydicom.data import get_testdata_file

from configs import Fit, FramePolicy, PreprocessConfig, TaskKind
from tasks.cache import cache_key
from tasks.champion import open_served_model
from tasks.decode import load_grey
from tasks.export import (GREY_INPUT_NAME, NORMALISED_FILE, export_onnx, export_self_contained, preprocessing_graph,
                          serving_metadata)
from tasks.transforms import PreprocessSpec

BASE = PreprocessSpec()
FILE = "US1_UNCR.dcm"  # a real 480 x 640 (landscape) ultrasound: crop and pad differ on it

# Each change, and the consumers it must change (mean, std and channels are applied at load
# time: the stored image, so its provenance and cache key, does not depend on them).
EVERY = {"transform", "graph", "metadata", "service", "provenance", "card", "cache key"}
CHANGES = {
    "resize": ({"resize": 288}, EVERY),
    "crop": ({"crop": 192}, EVERY),
    "fit": ({"fit": Fit.PAD}, EVERY),
    "antialias": ({"antialias": False}, EVERY),
    "mean": ({"mean": (0.5, 0.5, 0.5)}, EVERY - {"provenance", "cache key"}),
    "std": ({"std": (0.25, 0.25, 0.25)}, EVERY - {"provenance", "cache key"}),
}


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return load_grey(get_testdata_file(FILE))[0]


def consumers(spec: PreprocessSpec, grey: np.ndarray, networks, tmp_path) -> dict[str, object]:
    """What each consumer makes of `spec` for one decoded image."""
    image, steps = spec.to_uint8(grey)
    metadata = serving_metadata(task=TaskKind.CLASSIFICATION, label_names=["a", "b"], positive_index=1,
                                operating_threshold=None, spec=spec, metrics={}, training_data="0" * 64,
                                weights_name="none", weights_sha256="none", model_name="spec-test")
    path = export_self_contained(networks[spec.crop], tmp_path / "model.onnx", metadata)
    served = open_served_model("spec-test", "1", "fp32", path)
    session = ort.InferenceSession(preprocessing_graph(spec, 18).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    data = open(get_testdata_file(FILE), "rb").read()
    return {
        "transform": spec.normalise(torch.from_numpy(image)).numpy(),
        "graph": session.run(None, {GREY_INPUT_NAME: grey[None, None]})[0],
        "metadata": metadata["preprocess"],
        "service": (served.spec, served.spec.normalise(torch.from_numpy(served.prepare(Path("body"), data).crop)).numpy()),
        "provenance": steps,
        "card": spec.describe(),
        "cache key": cache_key(hashlib.sha256(data).hexdigest(), spec.cache_token(), FramePolicy.MIDDLE, 0),
    }


def _differ(a, b) -> bool:
    if isinstance(a, tuple):
        return any(_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.shape != b.shape or not np.array_equal(a, b)
    return a != b


@pytest.fixture(scope="module")
def networks(champion_registry, tmp_path_factory):
    """Real exported networks (the champion fixture's random-weights ResNet-18, normalised input)
    by input size: 224 as registered, and 192, exported here for the crop change."""
    _, model, full = champion_registry
    size = export_onnx(model, TaskKind.CLASSIFICATION, tmp_path_factory.mktemp("net192") / NORMALISED_FILE, 192, 18, {})
    return {224: full.parent / NORMALISED_FILE, 192: size}


@pytest.fixture(scope="module")
def base(grey, networks, tmp_path_factory):
    return consumers(BASE, grey, networks, tmp_path_factory.mktemp("spec-base"))


@pytest.mark.parametrize("field", CHANGES)
def test_changing_one_value_changes_every_consumer_it_concerns(field, grey, networks, base, tmp_path):
    change, concerned = CHANGES[field]
    spec = dataclasses.replace(BASE, **change)
    changed = consumers(spec, grey, networks, tmp_path)
    assert {name for name in changed if _differ(changed[name], base[name])} == concerned
    # ... and every one of them is still the same preprocessing:
    transform = changed["transform"]
    levels = np.abs(changed["graph"] - transform) * np.reshape(spec.std, (1, 3, 1, 1)) * 255
    assert changed["graph"].shape == transform.shape and levels.max() < 1.01  # ONNX Resize: a level at most
    rebuilt, served = changed["service"]
    assert rebuilt == spec  # every field, mean and std included, read back from the registered file
    np.testing.assert_array_equal(served, transform)
    assert PreprocessSpec.from_metadata(changed["metadata"]) == spec


def test_the_config_builds_the_spec():
    assert PreprocessSpec.from_config(PreprocessConfig(resize=300, crop=256, fit=Fit.PAD)) == PreprocessSpec(
        resize=300, crop=256, fit=Fit.PAD)


def test_models_exported_before_the_spec_are_read_as_centre_crops():
    old = ('{"resize_short_side": 256, "interpolation": "bilinear", "antialias": true, "center_crop": 224, '
           '"quantise": "uint8", "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
    assert PreprocessSpec.from_metadata(old) == BASE
