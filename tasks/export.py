"""Export to ONNX and check it against PyTorch in a real ONNX Runtime session."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from configs import TaskKind
from models.resnet import TransferResNet
from tasks.evaluate import predict
from tasks.io import atomic_path
from tasks.preprocess import to_model_input

log = logging.getLogger(__name__)

INPUT_NAME = "image"  # float32 (batch, 3, crop, crop), ImageNet-normalised
OUTPUT_NAMES = {TaskKind.CLASSIFICATION: "probabilities", TaskKind.REGRESSION: "age_years"}
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


class ParityError(RuntimeError):
    """The ONNX model does not reproduce PyTorch's outputs; it must not be registered."""


class ServingHead(nn.Module):
    """What callers get: probabilities (softmax of the logits) or age in years."""

    def __init__(self, model: nn.Module, task: TaskKind):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        return out.softmax(dim=1) if self.task is TaskKind.CLASSIFICATION else out


def export_onnx(model: nn.Module, task: TaskKind, path: Path, crop: int, opset: int,
                metadata: dict[str, str]) -> Path:
    """Write a checked ONNX file with a dynamic batch axis and `metadata` in its properties."""
    serving = ServingHead(model, task).eval().cpu()
    example = torch.zeros(2, 3, crop, crop)  # batch of 2 so the exporter keeps the axis symbolic
    program = torch.onnx.export(
        serving, (example,), dynamo=True, opset_version=opset, verbose=False,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAMES[task]],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    return Path(path)


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}


def update_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add or replace metadata properties in place (atomically); the graph is untouched."""
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, read_metadata(path) | extra)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)


def choose_providers() -> list[str]:
    """CUDA when this machine really has a GPU and the build supports it, then CPU.

    onnxruntime-gpu lists CUDA as available even without a GPU, so the torch
    check decides; the session reports which provider actually loaded.
    """
    available = ort.get_available_providers()
    wanted = [CUDA_PROVIDER] if torch.cuda.is_available() else []
    return [p for p in wanted if p in available] + [CPU_PROVIDER]


def open_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=choose_providers())


@dataclass(frozen=True)
class ParityReport:
    provider: str
    samples: int
    max_abs_diff: float
    tolerance: float
    decisions_match: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.decisions_match

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def check_parity(path: Path, model: TransferResNet, images: np.ndarray, tolerance: float) -> ParityReport:
    """Run the same uint8 images through PyTorch and ONNX Runtime and compare outputs.

    Classification compares probabilities and predicted classes. Regression
    compares ages divided by the training-set age spread (the head's own scale),
    so the tolerance means the same whatever the age range; it has no decision.
    """
    expected = predict(model.cpu(), images, batch_size=32)
    session = open_session(path)
    inputs = to_model_input(torch.from_numpy(np.asarray(images))).numpy()
    actual = session.run(None, {INPUT_NAME: inputs})[0]
    if model.task is TaskKind.CLASSIFICATION:
        diff = np.abs(actual - expected)
        decisions_match = bool((actual.argmax(axis=1) == expected.argmax(axis=1)).all())
    else:
        diff = np.abs(actual - expected) / float(model.target_std)
        decisions_match = True
    report = ParityReport(
        provider=session.get_providers()[0],
        samples=len(images),
        max_abs_diff=float(diff.max()),
        tolerance=tolerance,
        decisions_match=decisions_match,
    )
    log.info("ONNX parity on %s: %d images, max |diff| %.2e (tolerance %.0e), decisions %s",
             report.provider, report.samples, report.max_abs_diff, tolerance,
             "match" if report.decisions_match else "DIFFER")
    return report
