"""Pretrain a source model: a ResNet trained on a larger real dataset, registered in MLflow
so that fine-tune configs can start from it (`model.weights: mlflow:/<name>@<alias>`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from torchvision.transforms.v2 import functional as TF

from configs import PretrainConfig, SourceDataConfig
from models.resnet import SOURCE_ARTIFACT_DIR, SOURCE_BACKBONE_FILE, SOURCE_SHA256_TAG, TransferResNet
from tasks.io import atomic_path, sha256_file
from tasks.preprocess import PreparedData
from tasks.register import ensure_registered_model
from tasks.rejects import rejects_frame

SPLITS = ("train", "val", "test")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, size, size), antialiased bilinear."""
    resized = TF.resize(torch.from_numpy(images)[:, None], [size, size],
                        interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return resized[:, 0].numpy()


def load_source_data(config: SourceDataConfig, seed: int) -> PreparedData:
    """The .npz's official splits at `config.resolution`, shaped like a preprocessed dataset."""
    with np.load(config.npz) as archive:
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in archive]
        if missing:
            raise ValueError(f"{config.npz}: missing arrays {missing}")
        arrays = {s: (archive[f"{s}_images"], archive[f"{s}_labels"].reshape(-1)) for s in SPLITS}
    images, rows = [], []
    for split, (split_images, labels) in arrays.items():
        if split_images.dtype != np.uint8 or split_images.ndim != 3 or len(split_images) != len(labels):
            raise ValueError(f"{config.npz}: {split}_images must be uint8 (N, H, W) with one label each, "
                             f"got {split_images.dtype} {split_images.shape} and {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= len(config.label_names):
            raise ValueError(f"{config.npz}: {split}_labels outside 0..{len(config.label_names) - 1} "
                             f"(source.label_names has {len(config.label_names)} names)")
        keep = np.arange(len(labels))
        if split == "train" and config.max_train_samples:
            keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[: config.max_train_samples])
        images.append(resize_images(split_images[keep], config.resolution))
        rows.append(pd.DataFrame({"path": [f"{config.npz.name}:{split}_images[{i}]" for i in keep],
                                  "split": split, "target": labels[keep].astype(np.float32)}))
    return PreparedData(manifest=pd.concat(rows, ignore_index=True),
                        rejects=rejects_frame([]),  # a bundled array: nothing to reject
                        images=np.concatenate(images), cache_hits=0)


@dataclass(frozen=True)
class SourceModel:
    """A registered source model version and the backbone file it holds."""

    name: str
    version: str
    alias: str
    backbone_path: Path
    sha256: str

    @property
    def weights_uri(self) -> str:
        return f"mlflow:/{self.name}@{self.alias}"


def save_backbone(model: TransferResNet, run_dir: Path) -> tuple[Path, str]:
    """The backbone's state dict (no head) written atomically; returns its path and sha256."""
    path = run_dir / SOURCE_BACKBONE_FILE
    with atomic_path(path) as tmp:
        torch.save(model.backbone.state_dict(), tmp)
    return path, sha256_file(path)


def register_source_model(config: PretrainConfig, run_id: str, backbone_path: Path, sha256: str) -> SourceModel:
    """Log the backbone to the run, make it a registry version, and point the alias at it."""
    client = MlflowClient(config.registry.tracking_uri)
    name = config.registry.model_name
    client.log_artifact(run_id, str(backbone_path), SOURCE_ARTIFACT_DIR)
    ensure_registered_model(client, name)
    version = client.create_model_version(
        name, f"runs:/{run_id}/{SOURCE_ARTIFACT_DIR}", run_id=run_id,
        tags={SOURCE_SHA256_TAG: sha256, "arch": config.model.arch, "dataset": config.source.npz.name,
              "resolution": str(config.source.resolution), "role": "source model"})
    client.set_registered_model_alias(name, config.registry.alias, version.version)
    return SourceModel(name, str(version.version), config.registry.alias, backbone_path, sha256)
