"""Decoded grey image -> the model's input, defined once: `PreprocessSpec`.

The spec is built from the config (`from_config`) and is the single source of
every consumer of the preprocessing: the Python transform (`to_uint8`,
`normalise`), the ONNX graph (tasks.export.preprocessing_graph reads its
fields), the ONNX metadata (`to_metadata`, read back by `from_metadata`: the
service rebuilds the whole spec from the registered file), the provenance
steps, the model card's wording (`describe`) and the cache key (`cache_token`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from configs import Fit, PreprocessConfig
from tasks.j2k import REDUCED_DECODE_MARGIN, ReducedDecodeFloor
from tasks.rejects import RejectKind, UnreadableImage
from tasks.voi import IndexedGrey, expanded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Longest side / shortest side. Under `fit: crop` the short side is scaled to the model's size,
# so a sliver (a 10 x 2000 strip) would become enormous (256 x 51200); under either fit it is
# no radiograph.
MAX_ASPECT = 8
AIR = 0.0  # what `fit: pad` fills with: the darkest grey, as padding pixels are shown


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded grey image (float [0, 1], bright = dense) becomes the network's input.

    `fit: crop`: the short side to `resize`, then the centre `crop` x `crop`.
    `fit: pad`: the long side to `crop`, then padded to `crop` x `crop` with air, so that a
    landscape chest or a mammogram keeps all of its anatomy.
    Then rounding to 8-bit levels (`quantise`; what the cache stores), the grey repeated to
    `channels`, and `mean`/`std` per channel.
    """

    resize: int = 256
    crop: int = 224
    fit: Fit = Fit.CROP
    interpolation: str = "bilinear"
    antialias: bool = True
    quantise: str = "uint8"
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        # What the Python transform and the ONNX graph both implement, and nothing else.
        if self.interpolation != "bilinear" or self.quantise != "uint8" or self.channels != 3:
            raise ValueError(f"unsupported preprocessing: {self}")
        if self.fit is Fit.CROP and self.crop > self.resize:
            raise ValueError("crop must not exceed resize")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> PreprocessSpec:
        return cls(resize=config.resize, crop=config.crop, fit=config.fit)

    # ------------------------------------------------------------ the transform

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the resize gives: the short side to `resize` (crop) or the long side to `crop`
        (pad), the other side floor(target * side / reference) as torchvision computes it."""
        target, reference = ((self.resize, min(height, width)) if self.fit is Fit.CROP
                             else (self.crop, max(height, width)))
        return math.floor(target * height / reference), math.floor(target * width / reference)

    def to_uint8(self, grey: np.ndarray | IndexedGrey) -> tuple[np.ndarray, list[str]]:
        """The stored image (uint8 crop x crop, per frame for F x H x W) and the provenance steps
        that changed it: a resize only when the size changes, a crop or pad only when it cuts
        or fills something. An IndexedGrey that needs neither a resize nor a pad is cropped
        as indices into its levels, quantised once per level: the same pixels, without
        expanding the whole image to float first.

        8 bits are enough here because the VOI step has already mapped the
        clinically relevant range onto [0, 1]: 256 levels give a step of 1/255,
        about 0.017 ImageNet standard deviations after normalisation, well under
        the image noise, and the ImageNet weights were trained on 8-bit images. A
        uint8 crop is a quarter of the float32 size, which keeps the cache small.
        """
        if grey.ndim not in (2, 3):
            raise ValueError(f"expected a 2-D grey image or a stack of them, got shape {grey.shape}")
        height, width = grey.shape[-2:]
        if max(height, width) > MAX_ASPECT * min(height, width):
            raise UnreadableImage(RejectKind.BAD_GEOMETRY, f"{height}x{width} pixels: an aspect ratio over "
                                                           f"{MAX_ASPECT}:1 is not supported")
        steps = []
        size = self.resized_size(height, width)
        levels = None
        if isinstance(grey, IndexedGrey) and size == (height, width) and min(size) >= self.crop:
            levels, pixels = _quantised(grey.levels), grey.index
        else:
            pixels = np.ascontiguousarray(expanded(grey), dtype=np.float32)
        tensor = torch.from_numpy(pixels)
        tensor = tensor[None] if grey.ndim == 2 else tensor  # frames resize as channels
        if size != (height, width):
            tensor = TF.resize(tensor, list(size), interpolation=TF.InterpolationMode(self.interpolation),
                               antialias=self.antialias)
            side = "short" if self.fit is Fit.CROP else "long"
            steps.append(f"resize:{side}_side({self.resize if self.fit is Fit.CROP else self.crop},"
                         f"{self.interpolation}{',antialias' if self.antialias else ''})")
        if size != (self.crop, self.crop):
            # Centre crop; where the image is smaller (pad), torchvision pads with 0: air.
            tensor = TF.center_crop(tensor, [self.crop, self.crop])
            steps.append(f"crop:centre({self.crop})" if self.fit is Fit.CROP else f"pad:centre({self.crop},air)")
        out = _quantised(tensor.numpy()) if levels is None else np.take(levels, tensor.numpy())
        steps.append(f"quantize:{self.quantise}")
        return out[0] if grey.ndim == 2 else out, steps

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W) or (H,W) -> float32 (N,channels,H,W): grey repeated, then mean and std."""
        return to_model_input(images, self.mean, self.std)

    # ------------------------------------------------------------ what others read

    @property
    def decode_floor(self) -> ReducedDecodeFloor:
        """How far a JPEG 2000 may be decoded at reduced resolution for this spec: its resize
        target side kept at REDUCED_DECODE_MARGIN times the target, so the resize still shrinks."""
        if self.fit is Fit.CROP:
            return ReducedDecodeFloor(short_side=REDUCED_DECODE_MARGIN * self.resize)
        return ReducedDecodeFloor(long_side=REDUCED_DECODE_MARGIN * self.crop)

    def cache_token(self) -> str:
        """The fields that shape the stored uint8 image, for the cache key (mean, std and channels
        are applied at load time, so entries stay valid across them)."""
        return (f"fit={self.fit.value}:resize={self.resize}:crop={self.crop}:interpolation={self.interpolation}"
                f":antialias={self.antialias}:quantise={self.quantise}")

    def describe(self) -> str:
        """The model card's sentence for it."""
        interpolation = f"{'antialiased ' if self.antialias else ''}{self.interpolation}"
        if self.fit is Fit.CROP:
            geometry = f"short side to {self.resize} ({interpolation}), centre crop {self.crop} x {self.crop}"
        else:
            geometry = (f"long side to {self.crop} ({interpolation}), padded to {self.crop} x {self.crop} "
                        "with air, so nothing is cut off")
        named = "ImageNet mean/std" if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD) else "mean/std"
        return (f"{geometry}; rounded to 8-bit levels; repeated to {self.channels} channels and normalised with "
                f"{named} ({list(self.mean)}, {list(self.std)})")

    def to_metadata(self) -> str:
        """The `preprocess` ONNX metadata property: every field, as JSON."""
        return json.dumps(asdict(self) | {"fit": self.fit.value, "mean": list(self.mean), "std": list(self.std)})

    @classmethod
    def from_metadata(cls, text: str) -> PreprocessSpec:
        """The spec a registered file was exported with (`to_metadata`). Models exported before
        the spec wrote `resize_short_side` and `center_crop`, and always cropped."""
        fields = json.loads(text)
        if "resize_short_side" in fields:
            fields = {"resize": fields.pop("resize_short_side"), "crop": fields.pop("center_crop"), **fields}
        return cls(**fields | {"fit": Fit(fields.get("fit", Fit.CROP.value)), "mean": tuple(fields["mean"]),
                               "std": tuple(fields["std"])})


def _quantised(grey: np.ndarray) -> np.ndarray:
    """Grey in [0, 1] rounded to 8-bit levels. In numpy: on a 224 px crop its passes took half
    of torch's time (op overheads). rint, like torch.round and ONNX Round, rounds halves to even."""
    scaled = np.clip(grey, 0.0, 1.0) * np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def to_model_input(images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N,H,W) or (H,W) -> float32 (N,3,H,W), grey repeated, normalised by `mean`/`std`
    (ImageNet's unless given; a PreprocessSpec passes its own)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected (N,H,W) or (H,W), got shape {tuple(images.shape)}")
    x = images.to(torch.float32).div(255.0)[:, None].expand(-1, len(mean), -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
