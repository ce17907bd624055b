"""Training speed on real BUSI ultrasound images: cached-feature heads, strategies, precision, data loading.

1. `head`: features computed once and cached vs the frozen backbone run every epoch
   (the baseline, measured in the same run on the same images).
2. Training throughput (images/s) for head / partial / full, fp32 vs bf16, with and without
   channels_last, and how much of each step waits for the data loader.
3. Data loading with augmentation on, with 0 and 2 loader workers.

Speed does not depend on the weights' values, so the backbone is randomly initialised
(no ImageNet weights can be downloaded here). Run:
    flock /tmp/medxfer-bench.lock python -m benchmarks.train_speed [--images 200] [--epochs 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from benchmarks.machine import machine
from configs import AugmentConfig, FreezeStrategy, ModelConfig, Precision, TaskKind, TrainConfig
from models.resnet import apply_freeze, build_model, set_train_mode
from tasks.preprocess import SplitData
from tasks.transforms import PreprocessSpec
from tasks.train import (ImageDataset, autocast, build_augmentation, extract_features, fit_linear_head,
                         make_criterion, make_loader, model_input, param_groups, run_epoch, select_device,
                         standardise_features)

BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi256" / "breastmnist_split_busi256.npz"


def load_busi(n_images: int, resolution: int) -> SplitData:
    """The first `n_images` of the official BreastMNIST train split, 256 px BUSI, centre crop `resolution`."""
    with np.load(BUSI) as data:
        images, labels = data["train_images"][:n_images], data["train_labels"].reshape(-1)[:n_images]
    spec = PreprocessSpec(resize=round(resolution * 256 / 224), crop=resolution)
    crops = np.stack([spec.to_uint8(image / 255.0)[0] for image in images])
    return SplitData(crops, (labels == 0).astype(np.float32))  # 0 = malignant in BreastMNIST


def timed_epochs(split: SplitData, strategy: FreezeStrategy, device: torch.device, precision: Precision,
                 channels_last: bool, epochs: int, batch_size: int, cached: bool,
                 augment: AugmentConfig = AugmentConfig(), num_workers: int = 0) -> dict[str, float]:
    """Train `epochs` epochs with `tasks.train`'s loop (for `cached`, the SGD head the L-BFGS fit replaced,
    kept as the like-for-like caching comparison); returns seconds spent where."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)
    apply_freeze(model, strategy, frozen_stages=2)
    model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    feature_seconds = 0.0
    if cached:
        started = time.perf_counter()
        features = extract_features(model, split.images, batch_size, device, precision, channels_last)
        feature_seconds = time.perf_counter() - started
        dataset = TensorDataset(features, torch.from_numpy(split.targets))
        prepare, forward = (lambda f: f.to(device)), model.head
    else:
        dataset = ImageDataset(split, build_augmentation(augment, split.images.shape[-1]))
        prepare, forward = (lambda x: model_input(x, device, channels_last)), model.standardised
    loader = make_loader(dataset, split.targets, batch_size, 0, num_workers)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 0.1))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    criterion = make_criterion(model, TaskKind.CLASSIFICATION)
    data_seconds = compute_seconds = 0.0
    for epoch in range(epochs):
        set_train_mode(model, apply_freeze(model, strategy, 2))
        _, _, data, compute = run_epoch(loader, prepare, forward, criterion, optimizer, scheduler, device,
                                        precision, f"epoch {epoch + 1}")
        data_seconds, compute_seconds = data_seconds + data, compute_seconds + compute
    return {"feature": feature_seconds, "data": data_seconds, "compute": compute_seconds,
            "total": feature_seconds + data_seconds + compute_seconds, "images": epochs * len(split)}


def timed_probe(split: SplitData, device: torch.device, batch_size: int) -> dict[str, float]:
    """What `head` does in tasks.train: one feature pass, then one L-BFGS fit per default L2 strength."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)
    model.to(device)
    started = time.perf_counter()
    features = extract_features(model, split.images, batch_size, device, Precision.FP32, False)
    feature_seconds = time.perf_counter() - started
    standardised, _, _ = standardise_features(features)
    for l2 in TrainConfig().head_l2:
        fit_linear_head(standardised, torch.from_numpy(split.targets), TaskKind.CLASSIFICATION, 2, l2)
    fit_seconds = time.perf_counter() - started - feature_seconds
    return {"feature": feature_seconds, "fit": fit_seconds, "total": feature_seconds + fit_seconds}


def warm_up(split: SplitData, device: torch.device) -> None:
    """One untimed forward and backward pass, so lazy initialisation is not billed to the first row."""
    model, _ = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)
    model.to(device)
    for precision in (Precision.FP32, Precision.BF16):
        with autocast(device, precision):
            out = model(model_input(torch.from_numpy(split.images[:8]), device, False))
        out.float().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="training images for the head comparison")
    parser.add_argument("--epochs", type=int, default=5, help="epochs for the head comparison")
    parser.add_argument("--throughput-images", type=int, default=96, help="images per throughput row")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = select_device(args.device)
    split = load_busi(args.images, args.resolution)
    print(f"machine: {machine()}; device {device}; {args.resolution} px; batch {args.batch_size}")
    warm_up(split, device)

    print(f"\n## head: cached features vs frozen backbone every epoch ({len(split)} BUSI train images, "
          f"{args.epochs} epochs, fp32)\n")
    print("| mode | feature pass s | epochs s | total s | speed-up |\n|---|---|---|---|---|")
    baseline = timed_epochs(split, FreezeStrategy.HEAD, device, Precision.FP32, False, args.epochs,
                            args.batch_size, cached=False)
    cached = timed_epochs(split, FreezeStrategy.HEAD, device, Precision.FP32, False, args.epochs,
                          args.batch_size, cached=True)
    print(f"| frozen backbone every epoch (baseline) | 0 | {baseline['total']:.1f} | {baseline['total']:.1f} | 1.0x |")
    print(f"| cached features | {cached['feature']:.1f} | {cached['data'] + cached['compute']:.2f} | "
          f"{cached['total']:.1f} | {baseline['total'] / cached['total']:.1f}x |")
    probe = timed_probe(split, device, args.batch_size)
    print(f"| cached features + L-BFGS fits, {len(TrainConfig().head_l2)} L2 strengths (what `head` runs) | "
          f"{probe['feature']:.1f} | {probe['fit']:.2f} (fits) | {probe['total']:.1f} | "
          f"{baseline['total'] / probe['total']:.1f}x |")
    per_epoch_baseline = baseline["total"] / args.epochs
    per_epoch_cached = (cached["data"] + cached["compute"]) / args.epochs
    print(f"\nper epoch after the one feature pass: {per_epoch_cached * 1000:.1f} ms vs "
          f"{per_epoch_baseline:.1f} s ({per_epoch_baseline / per_epoch_cached:.0f}x)")

    rows = split.images[: args.throughput_images]
    small = SplitData(rows, split.targets[: len(rows)])
    print(f"\n## training throughput ({len(small)} images per row, 1 epoch, images/s over data + compute)\n")
    print("| strategy | precision | channels_last | images/s | data-loader wait % |\n|---|---|---|---|---|")
    for strategy in (FreezeStrategy.HEAD, FreezeStrategy.PARTIAL, FreezeStrategy.FULL):
        for precision in (Precision.FP32, Precision.BF16):
            for channels_last in (False, True):
                seconds = timed_epochs(small, strategy, device, precision, channels_last, 1, args.batch_size,
                                       cached=strategy is FreezeStrategy.HEAD)
                label = "head (cached; incl. feature pass)" if strategy is FreezeStrategy.HEAD else strategy.value
                print(f"| {label} | {precision.value} | {channels_last} | "
                      f"{seconds['images'] / seconds['total']:.1f} | "
                      f"{100 * seconds['data'] / seconds['total']:.1f} |")

    print(f"\n## data loading with augmentation (full, fp32, {len(small)} images)\n")
    print("| augmentation | loader workers | images/s | data-loader wait % |\n|---|---|---|---|")
    for enabled, workers in ((False, 0), (True, 0), (True, 2)):
        seconds = timed_epochs(small, FreezeStrategy.FULL, device, Precision.FP32, False, 1, args.batch_size,
                               cached=False, augment=AugmentConfig(enabled=enabled), num_workers=workers)
        print(f"| {'on' if enabled else 'off'} | {workers} | {seconds['images'] / seconds['total']:.1f} | "
              f"{100 * seconds['data'] / seconds['total']:.1f} |")


if __name__ == "__main__":
    main()
