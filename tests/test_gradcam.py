"""Grad-CAM on real BreastMNIST images: per-image maps that match a by-hand computation."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from configs import FreezeStrategy, PreprocessConfig, TaskKind
from models.resnet import TransferResNet, apply_freeze
from tasks.gradcam import explain_test_cases, grad_cam, pick_cases
from tasks.preprocess import preprocess_file
from tasks.transforms import to_model_input


@pytest.fixture(scope="module")
def test_images(breast_dicom_dir):
    manifest = pd.read_csv(breast_dicom_dir / "manifest.csv")
    rows = manifest[manifest["split"] == "test"][:6]
    config = PreprocessConfig(resize=72, crop=64, cache_dir=breast_dicom_dir.parent / "gradcam-cache")
    images = np.stack([preprocess_file(breast_dicom_dir / p, config).image for p in rows["path"]])
    return images, (rows["label"] == "malignant").to_numpy(int)


def by_hand(model: TransferResNet, image: np.ndarray, positive_index: int) -> np.ndarray:
    """Grad-CAM for one image, written out layer by layer with autograd.grad."""
    b = model.backbone
    x = to_model_input(torch.from_numpy(image[None])).requires_grad_(True)  # frozen weights: graph via input
    features = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
    logit = model.head(torch.flatten(b.avgpool(features), 1))[0, positive_index]
    (gradient,) = torch.autograd.grad(logit, features)
    cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).detach().numpy()


def test_batched_grad_cam_matches_single_image_computation_even_when_frozen(test_images):
    images, _ = test_images
    torch.manual_seed(0)
    model = TransferResNet("resnet18", 2, TaskKind.CLASSIFICATION).eval()
    apply_freeze(model, FreezeStrategy.HEAD, 0)  # no backbone gradients: the map must still come out
    heatmaps, probabilities = grad_cam(model, images, positive_index=1)
    assert heatmaps.shape == images.shape and heatmaps.min() >= 0 and np.allclose(heatmaps.max(axis=(1, 2)), 1)
    for i in (0, 3):
        assert np.allclose(heatmaps[i], by_hand(model, images[i], 1), atol=1e-4)
    with torch.inference_mode():
        expected = model(to_model_input(torch.from_numpy(images))).softmax(1)[:, 1].numpy()
    assert np.allclose(probabilities, expected, atol=1e-5)
    assert not np.allclose(heatmaps[0], heatmaps[1])  # each image gets its own map


def test_overlays_cover_both_classes_and_regression(tmp_path, test_images):
    images, labels = test_images
    assert sorted(labels[pick_cases(labels, TaskKind.CLASSIFICATION, 2)]) == [0, 1]
    torch.manual_seed(0)
    model = TransferResNet("resnet18", 2, TaskKind.CLASSIFICATION)
    paths = explain_test_cases(model, images, labels, TaskKind.CLASSIFICATION, ["benign", "malignant"],
                               tmp_path / "cls", count=4)
    assert len(paths) == 4 and all(p.suffix == ".png" and p.stat().st_size > 5000 for p in paths)
    ages = np.array([30.0, 70.0, 50.0, 41.0, 88.0, 62.0])
    regressor = TransferResNet("resnet18", 1, TaskKind.REGRESSION, target_mean=55.0, target_std=15.0)
    assert list(pick_cases(ages, TaskKind.REGRESSION, 3)) == [0, 2, 4]  # youngest (30), middle (50), oldest (88)
    assert len(explain_test_cases(regressor, images, ages, TaskKind.REGRESSION, [], tmp_path / "age", 3)) == 3
