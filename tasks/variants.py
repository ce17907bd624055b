"""The ONNX files a model ships as, verified: float32 graphs gated on parity with PyTorch,
and smaller, faster variants with what they cost in accuracy.

- int8: ONNX Runtime's dynamic quantisation (weights stored as 8 bits, activations
  quantised on the fly), for CPUs;
- fp16: weights and arithmetic in half precision (inputs and outputs stay float32),
  for GPUs.

Both transform the normalised network and put the same float32 preprocessing
graph in front, so every variant takes the same `grey` input as model.onnx.
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
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from configs import ExportConfig, TaskKind
from models.resnet import TransferResNet
from tasks.evaluate import compute_metrics
from tasks.export import (CPU_PROVIDER, FP16_FILE, INPUT_NAME, INT8_FILE, NORMALISED_FILE, SELF_CONTAINED_FILE,
                          ParityReport, check_parity, check_self_contained_parity, export_onnx,
                          export_self_contained, open_session, parity_providers, run_self_contained)
from tasks.transforms import PreprocessSpec


def quantise_network(normalised: Path, path: Path) -> Path:
    """Dynamic int8 quantisation of the normalised network (input `image`)."""
    proto = onnx.load(normalised)
    # The exporter's intermediate shape annotations trip the quantiser's own shape
    # inference (it infers (512,) where the exporter wrote a 2-D shape); it re-infers them.
    del proto.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        plain = Path(work) / "network.onnx"
        onnx.save_model(proto, plain)
        # Unsigned 8-bit weights: ONNX Runtime's x86 ConvInteger kernels ran about 3x
        # faster with them than with signed ones here (ResNet-18, batch 1).
        quantize_dynamic(plain, path, weight_type=QuantType.QUInt8)
    return Path(path)


def quantise_int8(normalised: Path, path: Path, metadata: dict[str, str]) -> Path:
    """Dynamic int8 quantisation of the network, behind the float32 preprocessing graph."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        network = quantise_network(normalised, Path(work) / "network_int8.onnx")
        return export_self_contained(network, path, metadata)


def half_precision(normalised: Path) -> onnx.ModelProto:
    """The network in fp16, with float32 inputs and outputs."""
    half = OnnxModel(convert_float_to_float16(onnx.load(normalised), keep_io_types=True))
    half.topological_sort()  # the converter appends its input casts at the end of the graph
    return half.model


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

    @property
    def lost(self) -> dict[str, float]:
        """Reference minus variant, per metric (positive = the variant is worse for
        higher-is-better metrics such as AUC; for MAE/RMSE a negative value is worse)."""
        return {k: self.reference[k] - self.metrics[k] for k in self.metrics}

    def as_dict(self) -> dict:
        return asdict(self) | {"lost": self.lost}


def variant_accuracy(variant: str, path: Path, reference: Path, greys: Sequence[np.ndarray],
                     targets: np.ndarray, task: TaskKind, positive_index: int,
                     providers: Sequence[str] | None = None) -> VariantAccuracy:
    """Test-set metrics of a variant next to the float32 model's, on the same decoded images."""
    session = open_session(path, providers)
    outputs = run_self_contained(session, greys)
    reference_outputs = run_self_contained(open_session(reference, providers), greys)
    return VariantAccuracy(
        variant=variant, provider=session.get_providers()[0], samples=len(greys),
        metrics=compute_metrics(task, targets, outputs, positive_index),
        reference=compute_metrics(task, targets, reference_outputs, positive_index),
    )


def accuracy_json(results: Sequence[VariantAccuracy]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2)


GATING_GRAPHS = ("normalised", "self-contained")


@dataclass
class ServingModels:
    """The verified ONNX files of one model and the evidence for them."""

    self_contained: Path
    normalised: Path
    variants: dict[str, Path]  # "int8", "fp16": only those that passed their checks
    parity: list[ParityReport]
    accuracy: list[VariantAccuracy]
    dropped: dict[str, str]  # variant -> why it was not kept

    @property
    def passed(self) -> bool:
        """The float32 graphs, which decide promotion, passed on every provider."""
        return all(r.passed for r in self.parity if r.graph in GATING_GRAPHS)

    def failure_reason(self) -> str:
        return "; ".join(f"{r.graph} graph on {r.provider}: {r.verdict()}"
                         for r in self.parity if r.graph in GATING_GRAPHS and not r.passed)

    def report_json(self) -> str:
        return json.dumps({"passed": self.passed, "reason": self.failure_reason(),
                           "parity": [r.as_dict() for r in self.parity],
                           "variants": {k: p.name for k, p in self.variants.items()},
                           "dropped": self.dropped,
                           "accuracy": [a.as_dict() for a in self.accuracy]}, indent=2)


def export_serving_models(model: TransferResNet, run_dir: Path, metadata: dict[str, str],
                          export: ExportConfig, *, test_crops: np.ndarray,
                          test_greys: Sequence[np.ndarray], test_targets: np.ndarray,
                          threshold: float, positive_index: int) -> ServingModels:
    """Export both float32 graphs and the enabled variants, and check each against PyTorch
    on held-out test images, on CPU and (where a GPU is present) CUDA.

    The float32 checks gate registration; a variant that fails its own check is dropped
    with the reason. Variant accuracy is measured on every test image given.
    """
    spec = PreprocessSpec.from_metadata(metadata["preprocess"])
    normalised = export_onnx(model, model.task, run_dir / NORMALISED_FILE, spec.crop, export.opset,
                             metadata | {"variant": "normalised", "input_name": INPUT_NAME})
    full = export_self_contained(normalised, run_dir / SELF_CONTAINED_FILE, metadata | {"variant": "fp32"})
    samples = export.parity_samples
    decide = {"threshold": threshold, "positive_index": positive_index}
    parity: list[ParityReport] = []
    for providers in parity_providers():
        parity.append(check_parity(normalised, model, test_crops[:samples], export.max_abs_diff,
                                   providers=providers, **decide))
        parity.append(check_self_contained_parity(full, model, test_greys[:samples], spec,
                                                  export.self_contained_max_abs_diff,
                                                  providers=providers, **decide))
    result = ServingModels(full, normalised, {}, parity, [], {})
    if not result.passed:
        return result

    makers = {"int8": (export.int8, quantise_int8, INT8_FILE, [CPU_PROVIDER]),
              # Half precision is for GPUs: checked on one where present, else on the CPU.
              "fp16": (export.fp16, convert_fp16, FP16_FILE, parity_providers()[-1])}
    for name, (enabled, make, filename, providers) in makers.items():
        if not enabled:
            continue
        path = make(normalised, run_dir / filename, metadata | {"variant": name})
        if name == "fp16":
            report = check_self_contained_parity(path, model, test_greys[:samples], spec,
                                                 export.fp16_max_abs_diff, providers=providers, **decide)
            report = dataclasses.replace(report, graph="fp16")
            parity.append(report)
            if not report.passed:
                result.dropped[name] = report.verdict()
                path.unlink()
                continue
        result.accuracy.append(variant_accuracy(name, path, full, test_greys, test_targets, model.task,
                                                positive_index, providers=providers))
        result.variants[name] = path
    return result
