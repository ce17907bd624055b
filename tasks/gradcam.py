"""Grad-CAM (Selvaraju et al., ICCV 2017) on the backbone's last residual stage.

Shows a radiologist which parts of an image drove the output: the layer4 feature
maps weighted by the spatially averaged gradient of the explained output (the
positive-class logit, or the predicted age), ReLU, upsampled to the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.nn import functional as F

from configs import TaskKind
from models.resnet import TransferResNet
from tasks.evaluate import save_figure
from tasks.transforms import to_model_input


@dataclass(frozen=True)
class Explained:
    index: int  # row in the split
    heatmap: np.ndarray  # (H, W) in [0, 1], same size as the image
    output: float  # positive-class probability, or predicted age in years


def grad_cam(model: TransferResNet, images: np.ndarray, positive_index: int = 1,
             device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, H, W) in [0, 1] and outputs (N,) for uint8 images (N, H, W).

    Works with frozen backbones too: the input is made to require gradients so
    the graph reaches layer4 whatever the model's requires_grad flags say.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_activation(_module, _inputs, output: torch.Tensor) -> None:
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    model.eval()
    handle = model.backbone.layer4.register_forward_hook(keep_activation)
    try:
        x = to_model_input(torch.from_numpy(np.asarray(images))).to(device).requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            explained = out[:, positive_index] if model.task is TaskKind.CLASSIFICATION else out
            model.zero_grad(set_to_none=True)
            explained.sum().backward()  # samples are independent in eval mode, so one pass serves all
    finally:
        handle.remove()
    activation, gradient = captured["activation"].detach(), captured["gradient"]
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    with torch.no_grad():
        outputs = out.softmax(dim=1)[:, positive_index] if model.task is TaskKind.CLASSIFICATION else out
    return (cam / peak).cpu().numpy(), outputs.detach().float().cpu().numpy()


def pick_cases(targets: np.ndarray, task: TaskKind, count: int, positive_index: int = 1) -> np.ndarray:
    """Up to `count` test rows: both classes alternately (classification), else spread over the age range."""
    if task is TaskKind.CLASSIFICATION:
        positive = np.flatnonzero(targets.astype(int) == positive_index)
        negative = np.flatnonzero(targets.astype(int) != positive_index)
        interleaved = [i for pair in zip(positive, negative) for i in pair]
        rest = [i for i in np.concatenate([positive, negative]) if i not in interleaved]
        return np.asarray((interleaved + rest)[:count], dtype=int)
    return np.argsort(targets, kind="stable")[np.linspace(0, len(targets) - 1, min(count, len(targets))).astype(int)]


def save_overlays(images: np.ndarray, targets: np.ndarray, explained: list[Explained], task: TaskKind,
                  label_names: list[str], out_dir: Path, positive_index: int = 1) -> list[Path]:
    """One PNG per case: the image, and the heatmap over it, titled with truth and output."""
    paths = []
    for case in explained:
        if task is TaskKind.CLASSIFICATION:
            truth = label_names[int(targets[case.index])]
            caption = f"true {truth}; P({label_names[positive_index]}) {case.output:.2f}"
        else:
            caption = f"true age {targets[case.index]:.0f}; predicted {case.output:.0f}"
        fig, (left, right) = plt.subplots(1, 2, figsize=(6, 3.2))
        for ax in (left, right):
            ax.imshow(images[case.index], cmap="gray", vmin=0, vmax=255)
            ax.axis("off")
        right.imshow(case.heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        left.set_title(f"test image {case.index}", fontsize=9)
        right.set_title("Grad-CAM (layer4)", fontsize=9)
        fig.suptitle(caption, fontsize=9)
        paths.append(save_figure(fig, out_dir / f"gradcam_{case.index:04d}.png"))
    return paths


def explain_test_cases(model: TransferResNet, images: np.ndarray, targets: np.ndarray, task: TaskKind,
                       label_names: list[str], out_dir: Path, count: int, positive_index: int = 1,
                       device: torch.device | str = "cpu") -> list[Path]:
    """Grad-CAM overlays for a handful of test images; returns the PNG paths."""
    rows = pick_cases(targets, task, count, positive_index)
    if len(rows) == 0:
        return []
    heatmaps, outputs = grad_cam(model, images[rows], positive_index, device)
    explained = [Explained(int(row), heatmap, float(output)) for row, heatmap, output in zip(rows, heatmaps, outputs)]
    return save_overlays(images, targets, explained, task, label_names, out_dir, positive_index)
