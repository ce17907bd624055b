"""A torchvision ResNet with its ImageNet `fc` replaced by a task head."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from configs import FreezeStrategy, ModelConfig, TaskKind
from tasks.io import sha256_file

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
NO_WEIGHTS = "none"
# A source model registered by flows/pretrain.py: "mlflow:/<registered name>@<alias>".
MLFLOW_WEIGHTS = re.compile(r"^mlflow:/(?P<name>[^@/]+)@(?P<alias>[^@/]+)$")
# What a registered source model version holds: the backbone state dict, and its sha256 as a tag.
SOURCE_ARTIFACT_DIR = "source_model"
SOURCE_BACKBONE_FILE = "backbone.pt"
SOURCE_SHA256_TAG = "backbone_sha256"
# The stages of a torchvision ResNet, input to output; `partial` freezes a prefix.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or fails its sha256 check."""


@dataclass(frozen=True)
class WeightsInfo:
    """What the backbone really started from, recorded with every run."""

    name: str  # e.g. "ResNet18_Weights.IMAGENET1K_V1", "none", or a file name
    sha256: str | None
    pretrained: bool
    # Why the configured weights were not loaded (ImageNet weights neither cached nor
    # downloadable), so the run can say so where the ops team looks; None when they were.
    fallback_reason: str | None = None

    def describe(self) -> str:
        if not self.pretrained:
            return "random initialisation (no pretrained weights)"
        return f"{self.name} (sha256 {self.sha256})"


class TransferResNet(nn.Module):
    """ResNet backbone + linear head.

    Classification returns logits. Regression trains on standardised targets, and
    the fixed affine `target_mean + target_std * z` makes `forward` return years.
    """

    def __init__(self, arch: str, num_outputs: int, task: TaskKind,
                 target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        backbone = tv_models.get_model(arch, weights=None)
        self.feature_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, num_outputs)
        self.task = task
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Head output before de-standardisation: logits, or z-scored age."""
        return self.head(self.backbone(x))

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """`forward` from backbone features: logits, or age in years."""
        out = self.head(features)
        if self.task is TaskKind.REGRESSION:
            return out.squeeze(-1) * self.target_std + self.target_mean
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.backbone(x))


def _imagenet_state(arch: str) -> tuple[dict, WeightsInfo] | str:
    """torchvision's IMAGENET1K_V1 weights from the TORCH_HOME cache, if present; else
    downloaded; else the reason they could not be had.

    Looks in the cache before downloading, so an offline machine with the file in
    `$TORCH_HOME/hub/checkpoints` works, and one without it does not hang.
    """
    weights = tv_models.get_model_weights(arch)["IMAGENET1K_V1"]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except OSError as exc:  # URLError, timeouts, refused connections
            reason = f"ImageNet weights {weights} are not in {cached.parent} and could not be downloaded ({exc})"
            log.warning(reason)
            return reason
    else:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    return state, WeightsInfo(name=str(weights), sha256=sha256_file(cached), pretrained=True)


def _file_state(path: Path, expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
    if not path.is_file():
        raise WeightsError(f"model.weights: file not found: {path}")
    actual = sha256_file(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise WeightsError(f"model.weights: {path} has sha256 {actual}, "
                           f"config expects {expected_sha256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # Accept a plain torchvision ResNet state dict or a TransferResNet one.
    state = {key.removeprefix("backbone."): value for key, value in state.items()}
    return state, WeightsInfo(name=path.name, sha256=actual, pretrained=True)


def _mlflow_state(name: str, alias: str, tracking_uri: str | None,
                  expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
    """The backbone of registered source model `name@alias`, checked against its sha256 tag."""
    import mlflow  # imported here: only this weights source needs it
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise WeightsError(f"model.weights: no source model mlflow:/{name}@{alias} "
                           f"in {tracking_uri or mlflow.get_tracking_uri()}: {exc.message}") from None
    recorded = version.tags.get(SOURCE_SHA256_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(
                version.run_id, f"{SOURCE_ARTIFACT_DIR}/{SOURCE_BACKBONE_FILE}", tmp))
        except (MlflowException, OSError) as exc:
            raise WeightsError(f"model.weights: mlflow:/{name}@{alias} (v{version.version}) has no "
                               f"{SOURCE_ARTIFACT_DIR}/{SOURCE_BACKBONE_FILE}: not a source model ({exc})") from None
        actual = sha256_file(path)
        for expected, what in ((recorded, f"its {SOURCE_SHA256_TAG} tag"), (expected_sha256, "the config")):
            if expected and actual != expected.lower():
                raise WeightsError(f"model.weights: mlflow:/{name}@{alias} (v{version.version}) has "
                                   f"sha256 {actual}, {what} expects {expected}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state, WeightsInfo(name=f"mlflow:/{name}@{alias} (v{version.version})", sha256=actual, pretrained=True)


def load_backbone_weights(model: TransferResNet, config: ModelConfig,
                          tracking_uri: str | None = None) -> WeightsInfo:
    """Fill the backbone from config.weights; the new head keeps its fresh init.

    `tracking_uri` is where `mlflow:/` source models are looked up.
    """
    if config.weights == NO_WEIGHTS:
        return WeightsInfo(name=NO_WEIGHTS, sha256=None, pretrained=False)
    if config.weights == IMAGENET:
        found = _imagenet_state(config.arch)
        if isinstance(found, str):
            return WeightsInfo(name=NO_WEIGHTS, sha256=None, pretrained=False, fallback_reason=found)
        state, info = found
    elif registered := MLFLOW_WEIGHTS.match(config.weights):
        state, info = _mlflow_state(registered["name"], registered["alias"], tracking_uri,
                                    config.weights_sha256)
    else:
        state, info = _file_state(Path(config.weights), config.weights_sha256)
    backbone_state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    try:
        model.backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        first_problem = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise WeightsError(f"model.weights: {info.name} does not fit {config.arch}: {first_problem}") from None
    return info


def resolve_freeze(config: ModelConfig, n_train: int, pretrained: bool) -> tuple[FreezeStrategy, str]:
    """The strategy to use and why. `auto`: head below the threshold, full above.

    A randomly initialised backbone is never frozen: its features carry nothing.
    """
    if not pretrained:
        return FreezeStrategy.FULL, "no pretrained weights: a random backbone must train"
    if config.freeze is not FreezeStrategy.AUTO:
        return config.freeze, "set in config"
    if n_train < config.auto_full_threshold:
        return FreezeStrategy.HEAD, f"{n_train} training images < {config.auto_full_threshold}"
    return FreezeStrategy.FULL, f"{n_train} training images >= {config.auto_full_threshold}"


def frozen_modules(model: TransferResNet, strategy: FreezeStrategy, frozen_stages: int) -> list[nn.Module]:
    """The backbone parts that `strategy` keeps fixed."""
    backbone = model.backbone
    stem = nn.ModuleList([backbone.conv1, backbone.bn1])
    stages = [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if strategy is FreezeStrategy.HEAD:
        return stages
    if strategy is FreezeStrategy.PARTIAL:
        return stages[: frozen_stages + 1]  # the stem always goes with the first stages
    return []


def apply_freeze(model: TransferResNet, strategy: FreezeStrategy, frozen_stages: int) -> list[nn.Module]:
    """Gradients everywhere except the frozen parts; returns those for `set_train_mode`.

    Idempotent, so gradual unfreezing can call it again with the next phase's strategy.
    """
    frozen = frozen_modules(model, strategy, frozen_stages)
    model.requires_grad_(True)
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Train mode, except frozen parts stay in eval so BatchNorm keeps its pretrained statistics.

    A frozen BatchNorm in train mode would still update its running mean and variance from
    the new data's batches (and normalise with batch statistics), silently changing the
    "frozen" features; eval mode keeps them exactly as pretrained.
    """
    model.train()
    for module in frozen:
        module.eval()


def build_model(config: ModelConfig, task: TaskKind, num_outputs: int,
                target_mean: float = 0.0, target_std: float = 1.0,
                tracking_uri: str | None = None) -> tuple[TransferResNet, WeightsInfo]:
    model = TransferResNet(config.arch, num_outputs, task, target_mean, target_std)
    info = load_backbone_weights(model, config, tracking_uri)
    return model, info
