"""Decoded grey image -> the model's input: geometry, 8-bit quantisation and normalisation."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_and_crop(grey: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Short side to `resize` (antialiased bilinear), centre crop `crop`, as uint8 (per frame for F x H x W).

    8 bits are enough here because the VOI step has already mapped the
    clinically relevant range onto [0, 1]: 256 levels give a step of 1/255,
    about 0.017 ImageNet standard deviations after normalisation, well under
    the image noise, and the ImageNet weights were trained on 8-bit images. A
    uint8 crop is a quarter of the float32 size, which keeps the cache small.
    """
    if grey.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D grey image or a stack of them, got shape {grey.shape}")
    if crop > resize:
        raise ValueError("crop must not exceed resize")
    tensor = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))
    tensor = tensor[None] if grey.ndim == 2 else tensor  # frames resize as channels
    if min(grey.shape[-2:]) != resize:  # at the target size already, the resize is the identity
        tensor = TF.resize(tensor, [resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    tensor = TF.center_crop(tensor, [crop, crop])
    out = torch.round(tensor.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return (out[0] if grey.ndim == 2 else out).numpy()


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W) or (H,W) -> float32 (N,3,H,W), grey repeated, ImageNet-normalised."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected (N,H,W) or (H,W), got shape {tuple(images.shape)}")
    x = images.to(torch.float32).div(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

