"""Export to ONNX and check it against PyTorch in a real ONNX Runtime session.

Two graphs are written for every model:

- the *self-contained* model (`model.onnx`): input `grey`, float32 (batch, 1, H, W)
  in [0, 1] after DICOM decoding and windowing, any H and W. The graph itself does
  the preprocessing its metadata's spec (tasks.transforms.PreprocessSpec) says:
  resize, centre crop or pad, rounding to the 8-bit levels the model was trained
  and evaluated on, the grey channel repeated, mean/std, so a caller cannot get
  preprocessing wrong;
- the *normalised* model (`model_normalised.onnx`): input `image`, float32
  (batch, 3, crop, crop), already normalised, for callers with their own tensors.

With a fitted domain check (tasks/domain.py) both also output `domain_score`, the image
novelty computed from the same penultimate features the head reads, and carry its threshold
and the training header facts in their metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pydicom
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper
from torch import nn

from configs import Fit, FramePolicy, PreprocessConfig, TaskKind
from models.resnet import TransferResNet
from tasks.domain import DOMAIN_OUTPUT, image_features, novelty_scores
from tasks.evaluate import predict
from tasks.io import atomic_path
from tasks.decode import DEFAULT_LIMITS, DecodeLimits, load_grey
from tasks.j2k import ReducedDecodeFloor
from tasks.transforms import PreprocessSpec, to_model_input

log = logging.getLogger(__name__)

INPUT_NAME = "image"  # normalised variant: float32 (batch, 3, crop, crop), ImageNet-normalised
GREY_INPUT_NAME = "grey"  # self-contained variant: float32 (batch, 1, H, W) in [0, 1]
OUTPUT_NAMES = {TaskKind.CLASSIFICATION: "probabilities", TaskKind.REGRESSION: "age_years"}
SELF_CONTAINED_FILE, NORMALISED_FILE = "model.onnx", "model_normalised.onnx"
INT8_FILE, FP16_FILE = "model_int8.onnx", "model_fp16.onnx"
TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = (TRT_PROVIDER, CUDA_PROVIDER)
# Binary classification without a threshold chosen on validation: positive when
# p(positive) >= 0.5, which for two classes is the argmax decision.
DEFAULT_THRESHOLD = 0.5
# ONNX Runtime 1.31 loads IR version 13 at most; onnx.helper would stamp its newest.
ONNX_IR_VERSION = 10


class ParityError(RuntimeError):
    """The ONNX model does not reproduce PyTorch's outputs; it must not be registered."""


class ServingHead(nn.Module):
    """What callers get: probabilities (softmax of the logits) or age in years, and with a
    `novelty` module (tasks.domain) the domain score of the same backbone features."""

    def __init__(self, model: TransferResNet, task: TaskKind, novelty: nn.Module | None = None):
        super().__init__()
        self.model, self.task, self.novelty = model, task, novelty

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(image)
        out = self.model.from_features(features)
        out = out.softmax(dim=1) if self.task is TaskKind.CLASSIFICATION else out
        return out if self.novelty is None else (out, self.novelty(features))


def export_onnx(model: TransferResNet, task: TaskKind, path: Path, crop: int, opset: int,
                metadata: dict[str, str], novelty: nn.Module | None = None) -> Path:
    """Write the normalised-input graph, checked, with a dynamic batch axis and `metadata`;
    with `novelty`, a second output `domain_score`."""
    serving = ServingHead(model, task, novelty).eval().cpu()
    example = torch.zeros(2, 3, crop, crop)  # batch of 2 so the exporter keeps the axis symbolic
    outputs = [OUTPUT_NAMES[task]] + ([DOMAIN_OUTPUT] if novelty is not None else [])
    program = torch.onnx.export(
        serving, (example,), dynamo=True, opset_version=opset, verbose=False,
        input_names=[INPUT_NAME], output_names=outputs,
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
    )
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
    _save_checked(proto, path, metadata)
    return Path(path)


def preprocessing_graph(spec: PreprocessSpec, opset: int) -> onnx.ModelProto:
    """grey (N, 1, H, W) in [0, 1] -> normalised image (N, channels, crop, crop), as ONNX ops.

    `spec` in ONNX ops, as tasks.transforms does it: the resize target side (the short
    side to `resize` for fit crop, the long side to `crop` for fit pad) with the other
    side floor(target * side / reference) (torchvision's rule, computed in float64),
    bilinear with half-pixel centres (antialiased if the spec says so), then a centre
    crop with round-half-even offsets (Python's round) or a centre pad with air (0)
    (torchvision's split: the odd pixel after), 8-bit rounding, channels, mean/std.
    """
    def const(name: str, value, dtype) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    crop, shape = spec.crop, (1, spec.channels, 1, 1)
    target, reference = (spec.resize, "ReduceMin") if spec.fit is Fit.CROP else (spec.crop, "ReduceMax")
    initializers = [
        const("pre_target", target, np.float64), const("pre_crop", [crop, crop], np.int64),
        const("pre_two", 2.0, np.float64), const("pre_two_int", 2, np.int64), const("pre_hw_index", [2, 3], np.int64),
        const("pre_levels", 255.0, np.float32), const("pre_zero", 0.0, np.float32),
        const("pre_one", 1.0, np.float32), const("pre_channels", shape, np.int64),
        const("pre_mean", np.reshape(spec.mean, shape), np.float32),
        const("pre_std", np.reshape(spec.std, shape), np.float32),
    ]
    node = oh.make_node
    nodes = [
        node("Shape", [GREY_INPUT_NAME], ["pre_shape"]),
        node("Gather", ["pre_shape", "pre_hw_index"], ["pre_hw"]),
        node("Cast", ["pre_hw"], ["pre_hw_f"], to=TensorProto.DOUBLE),
        node(reference, ["pre_hw_f"], ["pre_reference"], keepdims=0),
        node("Mul", ["pre_hw_f", "pre_target"], ["pre_hw_scaled"]),
        node("Div", ["pre_hw_scaled", "pre_reference"], ["pre_new_hw_f"]),
        node("Floor", ["pre_new_hw_f"], ["pre_new_hw_floor"]),
        node("Cast", ["pre_new_hw_floor"], ["pre_new_hw"], to=TensorProto.INT64),
        node("Resize", [GREY_INPUT_NAME, "", "", "pre_new_hw"], ["pre_resized"], mode="linear",
             antialias=int(spec.antialias), coordinate_transformation_mode="half_pixel", axes=[2, 3],
             # torchvision's antialiased filter renormalises its weights at the image's border, which
             # a pad keeps in view (a crop cuts it away); ONNX Runtime allows it with antialias only.
             exclude_outside=int(spec.antialias)),
    ]
    if spec.fit is Fit.CROP:
        nodes += [
            node("Sub", ["pre_new_hw", "pre_crop"], ["pre_margin"]),
            node("Cast", ["pre_margin"], ["pre_margin_f"], to=TensorProto.DOUBLE),
            node("Div", ["pre_margin_f", "pre_two"], ["pre_half_margin"]),
            node("Round", ["pre_half_margin"], ["pre_start_f"]),
            node("Cast", ["pre_start_f"], ["pre_start"], to=TensorProto.INT64),
            node("Add", ["pre_start", "pre_crop"], ["pre_end"]),
            node("Slice", ["pre_resized", "pre_start", "pre_end", "pre_hw_index"], ["pre_fitted"]),
        ]
    else:  # the long side is `crop` already: pad the short one, the odd pixel after, as torchvision does
        nodes += [
            node("Sub", ["pre_crop", "pre_new_hw"], ["pre_missing"]),
            node("Div", ["pre_missing", "pre_two_int"], ["pre_before"]),
            node("Sub", ["pre_missing", "pre_before"], ["pre_after"]),
            node("Concat", ["pre_before", "pre_after"], ["pre_pads"], axis=0),
            node("Pad", ["pre_resized", "pre_pads", "pre_zero", "pre_hw_index"], ["pre_fitted"], mode="constant"),
        ]
    nodes += [
        node("Clip", ["pre_fitted", "pre_zero", "pre_one"], ["pre_clipped"]),
        node("Mul", ["pre_clipped", "pre_levels"], ["pre_scaled"]),
        node("Round", ["pre_scaled"], ["pre_rounded"]),
        node("Div", ["pre_rounded", "pre_levels"], ["pre_quantised"]),
        node("Tile", ["pre_quantised", "pre_channels"], ["pre_rgb"]),
        node("Sub", ["pre_rgb", "pre_mean"], ["pre_centred"]),
        node("Div", ["pre_centred", "pre_std"], [INPUT_NAME]),
    ]
    graph = oh.make_graph(
        nodes, "preprocess",
        [oh.make_tensor_value_info(GREY_INPUT_NAME, TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [oh.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", spec.channels, crop, crop])],
        initializers,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_self_contained(normalised: Path, path: Path, metadata: dict[str, str]) -> Path:
    """Prefix the normalised graph at `normalised` with the preprocessing graph of the spec the
    metadata records (`preprocess`): the file's graph and its metadata cannot disagree."""
    network = onnx.load(normalised)
    opset = next(o.version for o in network.opset_import if o.domain in ("", "ai.onnx"))
    pre = preprocessing_graph(PreprocessSpec.from_metadata(metadata["preprocess"]), opset)
    # onnx.compose needs both graphs to import the same opsets at the same IR version.
    pre.ir_version = network.ir_version
    for extra in network.opset_import:
        if extra.domain not in ("", "ai.onnx"):
            pre.opset_import.append(extra)
    merged = onnx.compose.merge_models(pre, network, io_map=[(INPUT_NAME, INPUT_NAME)])
    _save_checked(merged, path, metadata)
    return Path(path)


def network_graph(self_contained: onnx.ModelProto) -> onnx.ModelProto:
    """The network inside a self-contained graph (fp32, int8 or fp16), without the
    preprocessing in front: input `image`, the normalised crop, as in the normalised graph;
    every output (the prediction and, where present, `domain_score`)."""
    outputs = [output.name for output in self_contained.graph.output]
    return onnx.utils.Extractor(self_contained).extract_model([INPUT_NAME], outputs)


def _save_checked(proto: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}


def update_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add or replace metadata properties in place (atomically); the graph is untouched."""
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, read_metadata(path) | extra)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)


def training_data_sha256(manifest: pd.DataFrame) -> str:
    """One hash for the usable data: sha256 of the sorted file hashes in the manifest."""
    return hashlib.sha256("\n".join(sorted(manifest["sha256"])).encode()).hexdigest()


def serving_frame(frames: FramePolicy) -> FramePolicy:
    """The one frame a multi-frame request is answered for under the training frame policy."""
    return FramePolicy.FIRST if frames is FramePolicy.FIRST else FramePolicy.MIDDLE


def serving_metadata(*, task: TaskKind, label_names: Sequence[str], positive_index: int,
                     operating_threshold: float | None, spec: PreprocessSpec,
                     metrics: dict[str, float], training_data: str, weights_name: str,
                     weights_sha256: str, model_name: str, voi_window: int = 0,
                     frames: FramePolicy = FramePolicy.MIDDLE) -> dict[str, str]:
    """Everything a caller needs to use the model's output, as ONNX metadata properties.

    `decode` records how training decoded DICOM (VOI window index, frame), so the service and
    batch scoring decode a request the same way. One request gets one answer: a model trained
    on every frame (`frames: all`) is served the middle frame.
    """
    classification = task is TaskKind.CLASSIFICATION
    threshold_source = "validation" if operating_threshold is not None else "default"
    return {
        "task": task.value,
        "label_names": json.dumps(list(label_names)),
        "label_map": json.dumps({str(i): name for i, name in enumerate(label_names)}),
        "positive_label": label_names[positive_index] if classification else "",
        "positive_index": str(positive_index) if classification else "",
        "operating_threshold": str(operating_threshold if operating_threshold is not None
                                   else DEFAULT_THRESHOLD) if classification else "",
        "threshold_source": threshold_source if classification else "",
        "output_name": OUTPUT_NAMES[task],
        "output_unit": "probability per class (label_names order)" if classification else "years",
        "input_name": GREY_INPUT_NAME,
        "input_spec": "float32 (batch, 1, H, W), grey in [0, 1] after DICOM decoding and windowing, "
                      "bright = dense",
        "normalised_input_name": INPUT_NAME,
        "input_size": json.dumps([spec.channels, spec.crop, spec.crop]),
        **preprocessing_metadata(spec, voi_window, frames),
        "metrics": json.dumps({k: round(float(v), 6) for k, v in metrics.items()}),
        "training_data_sha256": training_data,
        "weights_name": weights_name,
        "weights_sha256": weights_sha256,
        "model_name": model_name,
    }


def preprocessing_metadata(spec: PreprocessSpec, voi_window: int, frames: FramePolicy) -> dict[str, str]:
    """The `preprocess` and `decode` metadata properties (see serving_metadata)."""
    return {"preprocess": spec.to_metadata(),
            "decode": json.dumps({"voi_window": voi_window, "frame": serving_frame(frames).value})}


@dataclass(frozen=True)
class ServedDecode:
    """How a request is decoded, read back from the model's metadata: training's VOI window and
    served frame (`decode`), and the reduced-resolution JPEG 2000 floor of its preprocessing
    spec. The service, batch scoring and the export check all decode through this, so what
    they check is what the metadata says."""

    frame: FramePolicy
    voi_window: int
    floor: ReducedDecodeFloor
    limits: DecodeLimits = DEFAULT_LIMITS  # the site's, not the model's: where it is served

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], limits: DecodeLimits = DEFAULT_LIMITS) -> ServedDecode:
        decode = json.loads(metadata.get("decode", "{}"))  # models exported before `decode` had the defaults
        return cls(frame=FramePolicy(decode.get("frame", FramePolicy.MIDDLE.value)),
                   voi_window=int(decode.get("voi_window", 0)),
                   floor=PreprocessSpec.from_metadata(metadata["preprocess"]).decode_floor, limits=limits)

    @classmethod
    def for_training(cls, preprocess: PreprocessConfig) -> ServedDecode:
        """What `from_metadata` will read back once `serving_metadata` has recorded this config
        (for evaluations that run before the export), with training's decode limits."""
        return cls.from_metadata(preprocessing_metadata(PreprocessSpec.from_config(preprocess), preprocess.voi_window,
                                                        preprocess.frames), DecodeLimits.from_config(preprocess))

    def __call__(self, path: Path, data: bytes | None = None, dataset: pydicom.Dataset | None = None) -> np.ndarray:
        """A DICOM/PNG/JPEG as grey [0, 1] (`data`: its bytes already read; `dataset`: its DICOM
        data set already parsed from them). Raises UnreadableImage."""
        return load_grey(path, data=data, frames=self.frame, voi_window=self.voi_window,
                         floor=self.floor, limits=self.limits, dataset=dataset)[0]


def decisions(outputs: np.ndarray, threshold: float, positive_index: int) -> np.ndarray:
    """Predicted class per row: the operating threshold on p(positive) for two classes,
    else the argmax."""
    if outputs.shape[1] == 2:
        other = 1 - positive_index
        return np.where(outputs[:, positive_index] >= threshold, positive_index, other)
    return outputs.argmax(axis=1)


def gpu_available() -> bool:
    """onnxruntime-gpu lists CUDA as available even without a GPU, so ask torch."""
    return torch.cuda.is_available()


def choose_providers() -> list[str]:
    """TensorRT, then CUDA, when this machine has a GPU and the build has them; then CPU."""
    available = ort.get_available_providers()
    wanted = [TRT_PROVIDER, CUDA_PROVIDER] if gpu_available() else []
    return [p for p in wanted if p in available] + [CPU_PROVIDER]


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia pip wheels into this process, once.

    onnxruntime-gpu's CUDA provider links libcublas.so.13, libcublasLt.so.13 and cuDNN, which
    the wheels keep under site-packages/nvidia, off the library path (`ldd` on the provider
    shows them "not found"): unless torch happened to load them first, the provider fails to
    load and the session silently falls back to the CPU."""
    ort.preload_dlls()


def open_session(model: Path | onnx.ModelProto, providers: Sequence[str] | None = None,
                 shares_cores: bool = False, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on a file or an in-memory graph. The provider it really runs
    on is `session.get_providers()[0]`; a fallback from the one asked for is logged.

    `shares_cores`: other threads of this process run beside the session's runs (the service
    decodes requests while a batch runs), so its CPU threads wait without spinning: a thread
    spinning until a preempted sibling catches up holds the core that a decode needs.
    `threads`: its intra-op threads (None: ONNX Runtime's default, one per core)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    providers = list(providers or choose_providers())
    if any(provider in GPU_PROVIDERS for provider in providers):
        preload_cuda_libraries()
    options = ort.SessionOptions()
    if shares_cores:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(source, options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        log.warning("ONNX Runtime could not use %s; the session runs on %s", providers[0],
                    session.get_providers()[0])
    return session


def parity_providers() -> list[list[str]]:
    """Provider lists the parity gate checks: CPU always, CUDA too where a GPU is present."""
    lists = [[CPU_PROVIDER]]
    if gpu_available() and CUDA_PROVIDER in ort.get_available_providers():
        lists.append([CUDA_PROVIDER, CPU_PROVIDER])
    return lists


@dataclass(frozen=True)
class DomainParity:
    """What the gate compares a graph's `domain_score` with: the PyTorch novelty module on the
    same features, within `tolerance` x the threshold (the score's own scale, whatever the
    method), and the same in-domain decisions at the threshold."""

    novelty: nn.Module
    threshold: float
    tolerance: float


@dataclass(frozen=True)
class ParityReport:
    graph: str
    provider: str
    samples: int
    max_abs_diff: float
    tolerance: float
    decisions_match: bool
    domain_max_rel_diff: float | None = None  # None: the graph has no domain_score
    domain_tolerance: float | None = None
    domain_decisions_match: bool = True
    gates_prediction: bool = True  # False: the prediction's difference is recorded, not gated (int8)

    @property
    def passed(self) -> bool:
        domain_ok = self.domain_max_rel_diff is None or (
            self.domain_max_rel_diff <= self.domain_tolerance and self.domain_decisions_match)
        prediction_ok = self.max_abs_diff <= self.tolerance and self.decisions_match
        return (prediction_ok or not self.gates_prediction) and domain_ok

    def verdict(self) -> str:
        text = (f"max |diff| {self.max_abs_diff:.3g} vs PyTorch (tolerance {self.tolerance:.0e}"
                f"{'' if self.gates_prediction else ', not gated'}), "
                f"decisions {'match' if self.decisions_match else 'DIFFER'}")
        if self.domain_max_rel_diff is not None:
            text += (f"; domain_score max |diff| {self.domain_max_rel_diff:.3g} of its threshold "
                     f"(tolerance {self.domain_tolerance:.0e}), in-domain decisions "
                     f"{'match' if self.domain_decisions_match else 'DIFFER'}")
        return text

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _compare(graph: str, provider: str, model: TransferResNet, actual: dict[str, np.ndarray], crops: np.ndarray,
             tolerance: float, threshold: float, positive_index: int,
             domain: DomainParity | None) -> ParityReport:
    """Classification compares probabilities and decisions at the operating threshold.
    Regression compares ages divided by the training-set age spread (the head's own
    scale), so the tolerance means the same whatever the age range; it has no decision.
    A graph with `domain_score` is compared with `domain` (and must have it when given)."""
    expected = predict(model.cpu(), crops, batch_size=32)
    output = actual[OUTPUT_NAMES[model.task]]
    if model.task is TaskKind.CLASSIFICATION:
        diff = np.abs(output - expected)
        decisions_match = bool((decisions(output, threshold, positive_index)
                                == decisions(expected, threshold, positive_index)).all())
    else:
        diff = np.abs(output - expected) / float(model.target_std)
        decisions_match = True
    report = ParityReport(graph, provider, len(expected), float(diff.max()), tolerance, decisions_match)
    if domain is None:
        return report
    if DOMAIN_OUTPUT not in actual:
        return dataclasses.replace(report, domain_max_rel_diff=float("inf"), domain_tolerance=domain.tolerance,
                                   domain_decisions_match=False)
    reference = novelty_scores(domain.novelty, image_features(model, crops))
    score = actual[DOMAIN_OUTPUT]
    relative = np.abs(score - reference) / domain.threshold
    return dataclasses.replace(
        report, domain_max_rel_diff=float(relative.max()), domain_tolerance=domain.tolerance,
        domain_decisions_match=bool(((score > domain.threshold) == (reference > domain.threshold)).all()))


def check_parity(path: Path, model: TransferResNet, images: np.ndarray, tolerance: float, *,
                 providers: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD,
                 positive_index: int = 1, domain: DomainParity | None = None) -> ParityReport:
    """The normalised graph vs PyTorch on the same uint8 crops."""
    session = open_session(path, providers)
    inputs = to_model_input(torch.from_numpy(np.asarray(images))).numpy()
    names = [output.name for output in session.get_outputs()]
    actual = dict(zip(names, session.run(None, {INPUT_NAME: inputs})))
    return _compare("normalised", session.get_providers()[0], model, actual, np.asarray(images), tolerance,
                    threshold, positive_index, domain)


def check_self_contained_parity(path: Path, model: TransferResNet, greys: Sequence[np.ndarray],
                                spec: PreprocessSpec, tolerance: float, *,
                                providers: Sequence[str] | None = None,
                                threshold: float = DEFAULT_THRESHOLD, positive_index: int = 1,
                                domain: DomainParity | None = None) -> ParityReport:
    """The self-contained graph on decoded grey images (their own sizes) vs PyTorch on the
    same images through `spec`'s transform, i.e. exactly what was evaluated."""
    crops = np.stack([spec.to_uint8(grey)[0] for grey in greys])
    session = open_session(path, providers)
    actual = run_self_contained_outputs(session, greys)
    return _compare("self-contained", session.get_providers()[0], model, actual, crops, tolerance,
                    threshold, positive_index, domain)


def run_self_contained(session: ort.InferenceSession, greys: Sequence[np.ndarray],
                       batch_size: int = 32) -> np.ndarray:
    """The first output (probabilities or ages) for grey images of any sizes, in order."""
    first = session.get_outputs()[0].name
    return run_self_contained_outputs(session, greys, batch_size)[first]


def run_self_contained_outputs(session: ort.InferenceSession, greys: Sequence[np.ndarray],
                               batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every output by name for grey images of any sizes, in order; same-sized images share a batch."""
    names = [output.name for output in session.get_outputs()]
    outputs: dict[str, list] = {name: [None] * len(greys) for name in names}
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, grey in enumerate(greys):
        by_shape.setdefault(grey.shape, []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = np.stack([greys[i] for i in chunk])[:, None].astype(np.float32, copy=False)
            for name, values in zip(names, session.run(None, {GREY_INPUT_NAME: batch})):
                for i, value in zip(chunk, values):
                    outputs[name][i] = value
    return {name: np.stack(values) for name, values in outputs.items()}
