"""The ONNX files a model ships as, verified: float32 graphs gated on parity with PyTorch,
and smaller, faster variants with what they cost in accuracy.

- int8: ONNX Runtime's static quantisation, for CPUs: QDQ format, int8 weights per output
  channel, uint8 activations whose scales are calibrated once on training crops (MinMax or
  percentile ranges, whichever stays closer to float32 on the validation crops). Fixed scales
  make an image's answer independent of its batch-mates, so the service batches int8 too.
  Kept only when its test-set loss is within `export.int8_*`; dropped with the reason otherwise;
- fp16: weights and arithmetic in half precision (inputs and outputs stay float32),
  for GPUs.

Both transform the normalised network and put the same float32 preprocessing
graph in front, so every variant takes the same `grey` input as model.onnx. The
domain-score nodes stay float32 in both (tasks.domain: a distance that sums
hundreds of squares overflows fp16 and loses its ranking in 8 bits); they read
the variant's own features, and the gate checks the score like every output.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from configs import ExportConfig, TaskKind
from models.resnet import TransferResNet
from tasks.domain import DOMAIN_OUTPUT
from tasks.evaluate import compute_metrics
from tasks.export import (CPU_PROVIDER, FP16_FILE, INPUT_NAME, INT8_FILE, NORMALISED_FILE, SELF_CONTAINED_FILE,
                          DomainParity, ParityReport, check_parity, check_self_contained_parity, decisions,
                          export_onnx, export_self_contained, open_session, parity_providers, run_self_contained)
from tasks.hardware import cpu_info
from tasks.transforms import PreprocessSpec

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
CALIBRATION_BATCH = 16


def calibration_sample(crops: np.ndarray, count: int) -> np.ndarray:
    """`count` crops spread evenly over the split (all of them when it has fewer), whatever its order."""
    if len(crops) <= count:
        return crops
    return crops[np.linspace(0, len(crops) - 1, count).round().astype(int)]


class CropBatches(CalibrationDataReader):
    """uint8 crops as `image` batches normalised by `spec`. Its length and range count batches, so that
    quantize_static's strided collection (`CalibStridedMinMax: 1`) holds one batch's activations
    at a time: percentile calibration keeps every activation it is given (~20 MB per image)."""

    def __init__(self, crops: np.ndarray, spec: PreprocessSpec):
        self.crops, self.spec = crops, spec
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.crops) // CALIBRATION_BATCH)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(range(start_index, min(end_index, len(self))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._batches, None)
        if index is None:
            return None
        batch = self.crops[index * CALIBRATION_BATCH:(index + 1) * CALIBRATION_BATCH]
        return {INPUT_NAME: self.spec.normalise(torch.from_numpy(np.ascontiguousarray(batch))).numpy()}


def split_domain(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]] | None:
    """(the network up to its prediction and the features the domain score reads, the domain
    head from those features to `domain_score`, the features' names); None without a domain score.

    A variant transforms the network alone and the head is put back unchanged in float32:
    onnxruntime's fp16 converter would round a blocked node's every input and output through
    fp16, and a distance summing hundreds of squares overflows there."""
    outputs = [o.name for o in proto.graph.output]
    if DOMAIN_OUTPUT not in outputs:
        return None
    producers = {out: node for node in proto.graph.node for out in node.output}

    def ancestors(output: str) -> set[int]:
        found, todo = set(), [output]
        while todo:
            node = producers.get(todo.pop())
            if node is not None and id(node) not in found:
                found.add(id(node))
                todo += list(node.input)
        return found

    prediction = set().union(*(ancestors(o) for o in outputs if o != DOMAIN_OUTPUT))
    head = [node for node in proto.graph.node if id(node) in ancestors(DOMAIN_OUTPUT) - prediction]
    features = sorted({name for node in head for name in node.input
                       if name in producers and id(producers[name]) in prediction})
    predicted = [o for o in outputs if o != DOMAIN_OUTPUT]
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto))  # it needs the cut's shapes
    return (extractor.extract_model([INPUT_NAME], predicted + features),
            extractor.extract_model(features, [DOMAIN_OUTPUT]), features)


def _rejoin_domain(network: onnx.ModelProto, head: onnx.ModelProto, features: list[str]) -> onnx.ModelProto:
    """The transformed network with the float32 domain head after it again."""
    head.ir_version = network.ir_version
    del head.graph.value_info[:]  # the network's annotations of the shared features stand
    del head.opset_import[:]
    head.opset_import.extend(network.opset_import)
    predicted = [o.name for o in network.graph.output if o.name not in features]
    return onnx.compose.merge_models(network, head, io_map=[(name, name) for name in features],
                                     outputs=predicted + [DOMAIN_OUTPUT])


def quantise_network(normalised: Path, path: Path, calibration_crops: np.ndarray, spec: PreprocessSpec,
                     method: str, reduce_range: bool) -> Path:
    """Static int8 quantisation of the normalised network (input `image`), calibrated on
    `calibration_crops` (uint8, N x crop x crop, normalised by `spec`) with `method`
    ("minmax" or "percentile"); a domain head stays float32."""
    proto = onnx.load(normalised)
    split = split_domain(proto)
    network = split[0] if split else proto
    # The exporter's intermediate shape annotations trip the quantiser's shape inference
    # (it infers (512,) where the exporter wrote a 2-D shape); pre-processing infers them again.
    del network.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        prepared, quantised = Path(work) / "prepared.onnx", Path(work) / "network_int8.onnx"
        # Shape inference and graph optimisation (BatchNorm folded into the convolutions)
        # first, as ONNX Runtime's quantisation guide asks.
        quant_pre_process(network, prepared)
        # uint8 activations x int8 weights: the pair x86's int8 dot-product instructions take
        # (VNNI's vpdpbusd, AVX2's vpmaddubsw multiply unsigned by signed bytes).
        quantize_static(prepared, quantised, CropBatches(calibration_crops, spec), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CALIBRATION_METHODS[method],
                        extra_options={"CalibStridedMinMax": 1})
        result = onnx.load(quantised)
    onnx.save_model(_rejoin_domain(result, split[1], split[2]) if split else result, path)
    return Path(path)


def network_outputs(network: Path, crops: np.ndarray, spec: PreprocessSpec, batch_size: int = 32) -> np.ndarray:
    """A normalised-input network's outputs for uint8 crops normalised by `spec`, on the CPU."""
    session = open_session(network, [CPU_PROVIDER])
    return np.concatenate([
        session.run(None, {INPUT_NAME: spec.normalise(torch.from_numpy(np.ascontiguousarray(
            crops[start:start + batch_size]))).numpy()})[0]
        for start in range(0, len(crops), batch_size)])


@dataclass(frozen=True)
class Calibration:
    """How the int8 variant was calibrated, and why with that method."""

    method: str
    images: int
    reduce_range: bool  # weights in 7 bits: the exporting CPU is x86 without VNNI
    cpu: str
    # Per method tried: mean |int8 - float32| of the network's outputs on the validation crops.
    validation_mean_abs_diff: dict[str, float]


def quantise_int8(normalised: Path, path: Path, metadata: dict[str, str], *,
                  calibration_crops: np.ndarray, selection_crops: np.ndarray,
                  methods: Sequence[str] = tuple(CALIBRATION_METHODS)) -> tuple[Path, Calibration]:
    """The int8 network behind the float32 preprocessing graph: quantised with each
    calibration method in `methods`, keeping the one whose outputs stay closest to float32
    on `selection_crops` (validation, so the test set only judges the result)."""
    cpu, spec = cpu_info(), PreprocessSpec.from_metadata(metadata["preprocess"])
    expected = network_outputs(normalised, selection_crops, spec)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        networks, diffs = {}, {}
        for method in methods:
            networks[method] = quantise_network(normalised, Path(work) / f"network_int8_{method}.onnx",
                                                calibration_crops, spec, method, cpu.int8_saturates)
            diffs[method] = float(np.abs(network_outputs(networks[method], selection_crops, spec) - expected).mean())
        best = min(diffs, key=diffs.get)
        export_self_contained(networks[best], path, metadata)
    return Path(path), Calibration(best, len(calibration_crops), cpu.int8_saturates, cpu.describe(), diffs)


def half_precision(normalised: Path) -> onnx.ModelProto:
    """The network in fp16, with float32 inputs and outputs."""
    network = onnx.load(normalised)
    split = split_domain(network)
    half = OnnxModel(convert_float_to_float16(split[0] if split else network, keep_io_types=True))
    half.topological_sort()  # the converter appends its input casts at the end of the graph
    return _rejoin_domain(half.model, split[1], split[2]) if split else half.model


def convert_fp16(normalised: Path, path: Path, metadata: dict[str, str]) -> Path:
    """Half-precision network behind the float32 preprocessing graph."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        network = Path(work) / "network_fp16.onnx"
        onnx.save_model(half_precision(normalised), network)
        return export_self_contained(network, path, metadata)


@dataclass(frozen=True)
class VariantAccuracy:
    variant: str
    provider: str
    samples: int
    metrics: dict[str, float]
    reference: dict[str, float]  # the float32 model.onnx on the same images
    decision_agreement: float | None  # classification: share of images with model.onnx's decision

    @property
    def lost(self) -> dict[str, float]:
        """Reference minus variant, per metric (positive = the variant is worse for
        higher-is-better metrics such as AUC; for MAE/RMSE a negative value is worse)."""
        return {k: self.reference[k] - self.metrics[k] for k in self.metrics}

    def as_dict(self) -> dict:
        return asdict(self) | {"lost": self.lost}


def variant_accuracy(variant: str, path: Path, reference: Path, greys: Sequence[np.ndarray],
                     targets: np.ndarray, task: TaskKind, positive_index: int, threshold: float,
                     providers: Sequence[str] | None = None) -> VariantAccuracy:
    """Test-set metrics of a variant next to the float32 model's, on the same decoded images,
    and how often the two decide alike at the operating threshold."""
    session = open_session(path, providers)
    outputs = run_self_contained(session, greys)
    reference_outputs = run_self_contained(open_session(reference, providers), greys)
    agreement = None
    if task is TaskKind.CLASSIFICATION:
        agreement = float((decisions(outputs, threshold, positive_index)
                           == decisions(reference_outputs, threshold, positive_index)).mean())
    return VariantAccuracy(
        variant=variant, provider=session.get_providers()[0], samples=len(greys),
        metrics=compute_metrics(task, targets, outputs, positive_index),
        reference=compute_metrics(task, targets, reference_outputs, positive_index),
        decision_agreement=agreement,
    )


def int8_loss_verdict(accuracy: VariantAccuracy, export: ExportConfig) -> str | None:
    """Why the int8 variant loses too much on the test set to be kept, or None when it is within
    `export.int8_max_auc_loss` and `int8_min_decision_agreement` (regression: `int8_max_mae_increase`)."""
    lost, problems = accuracy.lost, []
    if accuracy.decision_agreement is None:
        if -lost["mae"] > export.int8_max_mae_increase:
            problems.append(f"test MAE up {-lost['mae']:.4f} (tolerance {export.int8_max_mae_increase})")
    else:
        if lost["roc_auc"] > export.int8_max_auc_loss:
            problems.append(f"test AUC loss {lost['roc_auc']:.4f} (tolerance {export.int8_max_auc_loss})")
        if accuracy.decision_agreement < export.int8_min_decision_agreement:
            problems.append(f"decisions agree with model.onnx on {accuracy.decision_agreement:.2%} of "
                            f"{accuracy.samples} test images (at least {export.int8_min_decision_agreement:.0%} needed)")
    return "; ".join(problems) or None


GATING_GRAPHS = ("normalised", "self-contained")


@dataclass
class ServingModels:
    """The verified ONNX files of one model and the evidence for them."""

    self_contained: Path
    normalised: Path
    variants: dict[str, Path]  # "int8", "fp16": only those that passed their checks
    parity: list[ParityReport]
    accuracy: list[VariantAccuracy]  # every variant measured, kept or dropped
    dropped: dict[str, str]  # variant -> why it was not kept
    calibration: Calibration | None = None  # int8

    @property
    def passed(self) -> bool:
        """The float32 graphs, which decide promotion, passed on every provider."""
        return all(r.passed for r in self.parity if r.graph in GATING_GRAPHS)

    def failure_reason(self) -> str:
        return "; ".join(f"{r.graph} graph on {r.provider}: {r.verdict()}"
                         for r in self.parity if r.graph in GATING_GRAPHS and not r.passed)

    def keep_or_drop(self, variant: str, path: Path, accuracy: VariantAccuracy, failure: str | None) -> None:
        """The variant's accuracy is stated either way; the file stays only without a failure."""
        self.accuracy.append(accuracy)
        if failure:
            self.dropped[variant] = failure
            path.unlink()
        else:
            self.variants[variant] = path

    def report_json(self) -> str:
        return json.dumps({"passed": self.passed, "reason": self.failure_reason(),
                           "parity": [r.as_dict() for r in self.parity],
                           "variants": {k: p.name for k, p in self.variants.items()},
                           "dropped": self.dropped,
                           "accuracy": [a.as_dict() for a in self.accuracy],
                           "int8_calibration": asdict(self.calibration) if self.calibration else None}, indent=2)


def export_serving_models(model: TransferResNet, run_dir: Path, metadata: dict[str, str],
                          export: ExportConfig, *, train_crops: np.ndarray, val_crops: np.ndarray,
                          test_crops: np.ndarray, test_greys: Sequence[np.ndarray], test_targets: np.ndarray,
                          threshold: float, positive_index: int, novelty: torch.nn.Module | None = None,
                          domain_threshold: float | None = None) -> ServingModels:
    """Export both float32 graphs and the enabled variants, and check each against PyTorch
    on held-out test images, on CPU and (where a GPU is present) CUDA.

    The float32 checks gate registration; a variant that fails its own check is dropped
    with the reason: fp16 on parity with PyTorch, int8 (calibrated on `train_crops`, its
    calibration method chosen on `val_crops`) on its test-set loss. Variant accuracy is
    measured on every test image given. With `novelty` (tasks.domain) every graph also
    outputs `domain_score`, checked at `domain_threshold`: fp32 graphs within
    export.domain_max_rel_diff, int8 and fp16 within export.variant_domain_max_rel_diff
    (int8's probabilities are judged by its test-set loss, not by parity).
    """
    spec = PreprocessSpec.from_metadata(metadata["preprocess"])
    normalised = export_onnx(model, model.task, run_dir / NORMALISED_FILE, spec.crop, export.opset,
                             metadata | {"variant": "normalised", "input_name": INPUT_NAME}, novelty)
    full = export_self_contained(normalised, run_dir / SELF_CONTAINED_FILE, metadata | {"variant": "fp32"})
    samples = export.parity_samples
    domain = variant_domain = None
    if novelty is not None:
        domain = DomainParity(novelty, domain_threshold, export.domain_max_rel_diff)
        variant_domain = dataclasses.replace(domain, tolerance=export.variant_domain_max_rel_diff)
    decide = {"threshold": threshold, "positive_index": positive_index}
    parity: list[ParityReport] = []
    for providers in parity_providers():
        parity.append(check_parity(normalised, model, test_crops[:samples], export.max_abs_diff,
                                   providers=providers, domain=domain, **decide))
        parity.append(check_self_contained_parity(full, model, test_greys[:samples], spec,
                                                  export.self_contained_max_abs_diff,
                                                  providers=providers, domain=domain, **decide))
    result = ServingModels(full, normalised, {}, parity, [], {})
    if not result.passed:
        return result

    measure = dict(reference=full, greys=test_greys, targets=test_targets, task=model.task, **decide)
    made: dict[str, tuple[Path, list[str]]] = {}
    if export.int8:
        path, result.calibration = quantise_int8(
            normalised, run_dir / INT8_FILE, metadata | {"variant": "int8"},
            calibration_crops=calibration_sample(train_crops, export.int8_calibration_images),
            selection_crops=val_crops, methods=export.int8_calibration_methods)
        made["int8"] = path, [CPU_PROVIDER]
    if export.fp16:
        # Half precision is for GPUs: checked on one where present, else on the CPU.
        made["fp16"] = (convert_fp16(normalised, run_dir / FP16_FILE, metadata | {"variant": "fp16"}),
                        parity_providers()[-1])
    for name, (path, providers) in made.items():
        if name == "fp16" or variant_domain is not None:
            report = check_self_contained_parity(path, model, test_greys[:samples], spec,
                                                 export.fp16_max_abs_diff, providers=providers,
                                                 domain=variant_domain, **decide)
            # int8's outputs are judged by its test-set loss below; its domain score by parity.
            report = dataclasses.replace(report, graph=name, gates_prediction=name == "fp16")
            parity.append(report)
            if not report.passed:
                result.dropped[name] = report.verdict()
                path.unlink()
                continue
        accuracy = variant_accuracy(name, path, providers=providers, **measure)
        result.keep_or_drop(name, path, accuracy, int8_loss_verdict(accuracy, export) if name == "int8" else None)
    return result
