"""The registry's champion ONNX model: fetch it, open it, and turn its outputs into answers.

The registered file is self-contained (grey image of any size in, preprocessing inside
the graph), but a batch of such inputs must share one height and width, and real
traffic (DICOMs of many sizes) would then run one image per call. So the served model
is the network inside that file (`tasks.export.network_graph`; taken from the file
itself rather than from model_normalised.onnx so that the int8 and fp16 variants work
the same way and the sha256-checked file is the one served), fed by the project's
own transform of the preprocessing spec the file records (`PreprocessSpec.from_metadata`),
the code training and evaluation used: every image becomes the same normalised crop,
images of any sizes share a batch, and each answer is the one the parity gate compared
with PyTorch (normalised graph, export.max_abs_diff).
Every answer carries the domain check's verdict (tasks.domain): the graph's own
`domain_score` judged with the threshold and header facts in the file's metadata.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Sequence

import mlflow
import numpy as np
import onnx
import torch
from mlflow import MlflowClient

from configs import TaskKind
from tasks.decode import DEFAULT_LIMITS, DecodeLimits
from tasks.domain import DOMAIN_OUTPUT, NOT_CHECKED, DomainCheck, DomainVerdict, ImageFacts, judge, request_facts
from tasks.export import DEFAULT_THRESHOLD, INPUT_NAME, ServedDecode, decisions, network_graph, open_session
from tasks.formats import detect_format
from tasks.ingest import read_dicom_header
from tasks.io import sha256_file
from tasks.transforms import PreprocessSpec
from tasks.register import CHAMPION, onnx_tag

log = logging.getLogger(__name__)

FP32 = "fp32"


class ModelUnavailable(RuntimeError):
    """No champion to serve, or its ONNX file cannot be fetched or checked."""


@dataclass(frozen=True)
class Prediction:
    """One image's answer, ready to be returned as JSON, and its domain verdict (which the
    body carries too: `in_domain`, `domain_score`, `domain_reasons`)."""

    body: dict
    domain: DomainVerdict = NOT_CHECKED

    @classmethod
    def classification(cls, probabilities: np.ndarray, label: str, labels: Sequence[str],
                       positive_index: int, threshold: float, domain: DomainVerdict = NOT_CHECKED) -> "Prediction":
        return cls({
            "task": TaskKind.CLASSIFICATION.value,
            "label": label,
            "probabilities": {name: float(p) for name, p in zip(labels, probabilities)},
            "positive_label": labels[positive_index],
            "positive_probability": float(probabilities[positive_index]),
            "threshold": threshold,
        } | domain.as_json(), domain)

    @classmethod
    def regression(cls, age: float, domain: DomainVerdict = NOT_CHECKED) -> "Prediction":
        return cls({"task": TaskKind.REGRESSION.value, "age_years": float(age)} | domain.as_json(), domain)


@dataclass
class ServedModel:
    """One registered model version, open in an ONNX Runtime session."""

    name: str
    version: str
    variant: str
    path: Path
    metadata: dict[str, str]
    session: object  # onnxruntime.InferenceSession on the network graph (input `image`)
    # A dynamically quantised network (int8 files exported before static quantisation)
    # scales activations by the range of the whole input tensor, so an image's answer
    # would depend on the other requests in its batch (4e-3 in probability for a
    # random-weights ResNet-18, measured): such a network runs one image per call.
    # Static int8 has fixed, calibrated scales and batches like fp32.
    per_image: bool
    limits: DecodeLimits = DEFAULT_LIMITS  # what a request may ask to have decoded
    network_calls: int = 0  # session runs so far: how many images shared a call shows here
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def task(self) -> TaskKind:
        return TaskKind(self.metadata["task"])

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("operating_threshold") or DEFAULT_THRESHOLD)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "variant": self.variant,
                "provider": self.provider}

    @cached_property  # read per request: parse the metadata once
    def spec(self) -> PreprocessSpec:
        """The preprocessing the model was trained, evaluated and exported with, every field
        read back from the registered file."""
        return PreprocessSpec.from_metadata(self.metadata["preprocess"])

    @cached_property
    def domain_check(self) -> DomainCheck | None:
        """The threshold and training header facts; None for a model exported without them."""
        return DomainCheck.from_metadata(self.metadata)

    @cached_property
    def decode(self) -> ServedDecode:
        """decode(path, data): a request's bytes as grey [0, 1], decoded as training decoded them."""
        return ServedDecode.from_metadata(self.metadata, self.limits)

    def prepare(self, path: Path, data: bytes) -> PreparedImage:
        """A request's bytes as the uint8 crop the network takes (decoded as training decoded
        them, resized and cropped as in evaluation) and its header facts for the domain check.
        The full-size grey image lives only here, so a batch holds crops. Raises
        UnreadableImage; this is one file's fault boundary, header facts included."""
        # One parse of the header for both: the facts first, from the header as it was sent
        # (ingest reads a training file's the same way), since the decode may amend it.
        header = read_dicom_header(data, detect_format(data))
        facts = request_facts(data, header)
        grey = self.decode(path, data, header)
        return PreparedImage(self.spec.to_uint8(grey)[0], grey.shape, facts)

    def predict(self, crops: Sequence[np.ndarray],
                facts: Sequence[ImageFacts | None] | None = None) -> list[Prediction]:
        """Answers for prepared crops (`prepare`), in order, all in one network call (one call
        per image for a per_image network). `facts`: each image's header facts for the
        domain check (None: not known)."""
        images = self.spec.normalise(torch.from_numpy(np.stack(crops))).numpy()
        batches = [image[None] for image in images] if self.per_image else [images]
        names = [output.name for output in self.session.get_outputs()]
        runs = [dict(zip(names, self.session.run(None, {INPUT_NAME: batch}))) for batch in batches]
        with self._count_lock:  # batches of the service's lanes run at once
            self.network_calls += len(batches)
        outputs = np.concatenate([run[names[0]] for run in runs])
        check = self.domain_check if DOMAIN_OUTPUT in names else None
        scores = np.concatenate([run[DOMAIN_OUTPUT] for run in runs]) if check else np.zeros(len(crops))
        facts = list(facts) if facts is not None else [None] * len(crops)
        verdicts = [judge(f, float(score), check) for f, score in zip(facts, scores)]
        if self.task is TaskKind.REGRESSION:
            return [Prediction.regression(age, v) for age, v in zip(outputs.reshape(-1), verdicts)]
        labels = json.loads(self.metadata["label_names"])
        positive = int(self.metadata.get("positive_index") or len(labels) - 1)
        chosen = decisions(outputs, self.threshold, positive)
        return [Prediction.classification(p, labels[c], labels, positive, self.threshold, v)
                for p, c, v in zip(outputs, chosen, verdicts)]


class PreparedImage(NamedTuple):
    crop: np.ndarray  # uint8 (crop, crop)
    size: tuple[int, ...]  # the decoded image's (rows, columns), for logs
    facts: ImageFacts  # its header facts, for the domain check


def champion_version(tracking_uri: str, name: str) -> str:
    """The version the `champion` alias points at now."""
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException as exc:
        raise ModelUnavailable(f"model {name!r} has no {CHAMPION} version in the registry") from exc


def load_champion(tracking_uri: str, name: str, variant: str, download_dir: Path,
                  limits: DecodeLimits = DEFAULT_LIMITS, threads: int | None = None) -> ServedModel:
    """Fetch the champion's ONNX file (main or a variant), check its sha256, open a session
    (`threads`: its ONNX Runtime threads; None: the runtime's default)."""
    client = MlflowClient(tracking_uri)
    version = champion_version(tracking_uri, name)
    tags = client.get_model_version(name, version).tags
    tag = onnx_tag(None if variant == FP32 else variant)
    if tag not in tags:
        raise ModelUnavailable(f"{name} v{version} has no {variant} ONNX file (tag {tag})")
    target = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=download_dir))
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=tags[tag], dst_path=str(target),
                                                    tracking_uri=tracking_uri))
    if variant == FP32 and tags.get("onnx_sha256") and sha256_file(path) != tags["onnx_sha256"]:
        raise ModelUnavailable(f"{name} v{version}: ONNX file does not match its registered sha256")
    model = open_served_model(name, version, variant, path, limits, threads)
    log.info("loaded %s v%s (%s) on %s", name, version, variant, model.provider)
    return model


def open_served_model(name: str, version: str, variant: str, path: Path,
                      limits: DecodeLimits = DEFAULT_LIMITS, threads: int | None = None) -> ServedModel:
    """The network inside the self-contained ONNX file at `path`, open in a session,
    with the file's metadata (the extracted graph carries none)."""
    proto = onnx.load(path)
    network = network_graph(proto)
    per_image = any(node.op_type == "DynamicQuantizeLinear" for node in network.graph.node)
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    session = open_session(network, shares_cores=True, threads=threads)
    return ServedModel(name, version, variant, path, metadata, session, per_image, limits)
