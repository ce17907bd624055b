"""The ONNX files a model ships as, verified: float32 graphs gated on parity with PyTorch,
and smaller, faster variants with what they cost in accuracy.

- int8: ONNX Runtime's dynamic quantisation (weights stored as 8 bits, activations
  quantised on the fly), for CPUs;
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
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from configs import ExportConfig, TaskKind
from models.resnet import TransferResNet
from tasks.evaluate import compute_metrics
from tasks.domain import DOMAIN_OUTPUT
from tasks.export import (CPU_PROVIDER, FP16_FILE, INPUT_NAME, INT8_FILE, NORMALISED_FILE, SELF_CONTAINED_FILE,
                          DomainParity, ParityReport, check_parity, check_self_contained_parity, export_onnx,
                          export_self_contained, open_session, parity_providers, run_self_contained)
from tasks.transforms import PreprocessSpec


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


def quantise_network(normalised: Path, path: Path) -> Path:
    """Dynamic int8 quantisation of the normalised network (input `image`); a domain head
    stays float32."""
    split = split_domain(onnx.load(normalised))
    proto = split[0] if split else onnx.load(normalised)
    # The exporter's intermediate shape annotations trip the quantiser's own shape
    # inference (it infers (512,) where the exporter wrote a 2-D shape); it re-infers them.
    del proto.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        plain, quantised = Path(work) / "network.onnx", Path(work) / "network_int8.onnx"
        onnx.save_model(proto, plain)
        # Unsigned 8-bit weights: ONNX Runtime's x86 ConvInteger kernels ran about 3x
        # faster with them than with signed ones here (ResNet-18, batch 1).
        quantize_dynamic(plain, quantised, weight_type=QuantType.QUInt8)
        result = onnx.load(quantised)
    onnx.save_model(_rejoin_domain(result, split[1], split[2]) if split else result, path)
    return Path(path)


def quantise_int8(normalised: Path, path: Path, metadata: dict[str, str]) -> Path:
    """Dynamic int8 quantisation of the network, behind the float32 preprocessing graph."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        network = quantise_network(normalised, Path(work) / "network_int8.onnx")
        return export_self_contained(network, path, metadata)


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
                          threshold: float, positive_index: int, novelty: torch.nn.Module | None = None,
                          domain_threshold: float | None = None) -> ServingModels:
    """Export both float32 graphs and the enabled variants, and check each against PyTorch
    on held-out test images, on CPU and (where a GPU is present) CUDA.

    The float32 checks gate registration; a variant that fails its own check is dropped
    with the reason. Variant accuracy is measured on every test image given. With `novelty`
    (tasks.domain) every graph also outputs `domain_score`, checked at `domain_threshold`:
    fp32 graphs within export.domain_max_rel_diff, int8 and fp16 within
    export.variant_domain_max_rel_diff (int8's probabilities are measured, not gated).
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

    makers = {"int8": (export.int8, quantise_int8, INT8_FILE, [CPU_PROVIDER]),
              # Half precision is for GPUs: checked on one where present, else on the CPU.
              "fp16": (export.fp16, convert_fp16, FP16_FILE, parity_providers()[-1])}
    for name, (enabled, make, filename, providers) in makers.items():
        if not enabled:
            continue
        path = make(normalised, run_dir / filename, metadata | {"variant": name})
        if name == "fp16" or variant_domain is not None:
            report = check_self_contained_parity(path, model, test_greys[:samples], spec,
                                                 export.fp16_max_abs_diff, providers=providers,
                                                 domain=variant_domain, **decide)
            # int8's outputs are measured (accuracy below), not gated; its domain score is.
            report = dataclasses.replace(report, graph=name, gates_prediction=name == "fp16")
            parity.append(report)
            if not report.passed:
                result.dropped[name] = report.verdict()
                path.unlink()
                continue
        result.accuracy.append(variant_accuracy(name, path, full, test_greys, test_targets, model.task,
                                                positive_index, providers=providers))
        result.variants[name] = path
    return result
