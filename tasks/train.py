"""Fine-tune: one readable training loop (AdamW, cosine schedule, early stopping).

`head` computes the frozen backbone's features once and fits the linear head on them to
convergence (L-BFGS on standardised features, its L2 strength chosen on validation: the
classic linear probe), in seconds. `partial` and `full` train through the backbone with
discriminative learning rates (backbone lr = head lr x `backbone_lr_factor`), optional
head-only warm-up epochs, optional augmentation, bf16 autocast and channels_last. With a
checkpoint folder, every epoch is checkpointed atomically and a restarted run resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from configs import AugmentConfig, ClassBalance, FreezeStrategy, ModelConfig, Precision, TaskKind, TaskSpec, TrainConfig
from models.resnet import TransferResNet, WeightsInfo, apply_freeze, build_model, resolve_freeze, set_train_mode
from tasks.evaluate import compute_metrics, predict, primary_metric
from tasks.hardware import cpu_info, training_precision
from tasks.io import atomic_path
from tasks.preprocess import SplitData
from tasks.transforms import to_model_input

log = logging.getLogger(__name__)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FeatureStore(Protocol):
    """Frozen-backbone features shared between training runs (tuning trials that only fit a head)."""

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The features stored under `key`, computing and storing them first if absent."""


# torch's global generator is one per process, and tuning trains trials side by side in threads
# (flows/tune.py). Whatever draws from it (a model's initial weights, an image's augmentation)
# does so under this lock from a seed of its own, so a trial trains what its seed gives alone.
GLOBAL_RNG = threading.Lock()


def _new_rng_lock_after_fork() -> None:
    # A DataLoader worker forked while another thread held the lock would wait for it forever.
    global GLOBAL_RNG
    GLOBAL_RNG = threading.Lock()


os.register_at_fork(after_in_child=_new_rng_lock_after_fork)


class ImageDataset(Dataset):
    """uint8 images (H, W) and targets; `augment` (training only) maps a uint8 (1, H, W) image.

    An image's augmentation is drawn from (seed, epoch, index), so it is the same in any thread,
    worker process or resumed run; set `epoch` before each pass. (A class-balanced epoch that draws
    an image twice augments it the same way twice.)
    """

    def __init__(self, split: SplitData, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0):
        self.split = split
        self.augment = augment
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.asarray(self.split.images[index]))
        if self.augment is not None:
            draws = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            with GLOBAL_RNG:
                torch.manual_seed(draws)
                image = self.augment(image[None])[0]
        return image, torch.tensor(self.split.targets[index])


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_metric: float
    lr: float | None  # the head's learning rate at the end of the epoch; None for a `head` fit (L-BFGS)
    seconds: float
    images_per_second: float
    data_seconds: float = 0.0  # waiting for the data loader
    compute_seconds: float = 0.0  # forward, backward and optimizer step
    head_l2: float | None = None  # `head`: the L2 strength of this fit (one "epoch" per strength tried)


@dataclass
class TrainResult:
    model: TransferResNet
    weights: WeightsInfo
    strategy: FreezeStrategy
    strategy_reason: str
    device: str
    metric_name: str
    best_epoch: int
    best_metric: float
    history: list[EpochResult] = field(default_factory=list)
    cached_features: bool = False  # `head`: the head trained on features computed once
    feature_seconds: float = 0.0  # time to compute those features (train + val)
    precision: str = Precision.FP32.value  # what training ran in (`auto` resolved)
    precision_reason: str = ""
    channels_last: bool = False
    resumed_from_epoch: int = 0  # 0: trained from the start


@dataclass
class EarlyStopping:
    """Tracks the best validation value; says when `patience` epochs brought no gain."""

    patience: int
    higher_is_better: bool
    best: float = float("nan")
    stale_epochs: int = 0

    def improved(self, value: float) -> bool:
        gain = np.isnan(self.best) or (value > self.best if self.higher_is_better else value < self.best)
        if gain:
            self.best, self.stale_epochs = value, 0
        else:
            self.stale_epochs += 1
        return bool(gain)

    @property
    def should_stop(self) -> bool:
        return self.stale_epochs >= self.patience


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for, but torch sees no CUDA device")
    return torch.device(preference)


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """bf16 autocast on CPU or CUDA; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision is Precision.BF16)


def build_augmentation(config: AugmentConfig, size: int) -> v2.Compose | None:
    """Small rotations and shifts and a mild random resized crop; flips only when anatomy allows."""
    if not config.enabled:
        return None
    steps = [v2.RandomResizedCrop(size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
             v2.RandomAffine(degrees=config.rotation_degrees,
                             translate=(config.translate_fraction, config.translate_fraction))]
    if config.allow_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 everywhere."""
    counts = np.bincount(targets.astype(int), minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"train.class_balance: class index(es) {missing} have no training images")
    return torch.tensor(len(targets) / (num_classes * counts), dtype=torch.float32)


def make_loader(dataset: Dataset, targets: np.ndarray, batch_size: int, seed: int, num_workers: int,
                balance: ClassBalance = ClassBalance.NONE, num_classes: int = 0) -> DataLoader:
    """Shuffled batches, or class-balanced draws with replacement; order fixed by `seed`.

    The loader's one generator drives the order (and the workers' seeds), so saving its
    state in a checkpoint is enough to replay the remaining epochs exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    if balance is ClassBalance.BALANCED_SAMPLER:
        per_sample = class_weights(targets, num_classes)[targets.astype(int)].double()
        sampler = WeightedRandomSampler(per_sample, num_samples=len(targets), replacement=True,
                                        generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      num_workers=num_workers)


def make_criterion(model: TransferResNet, task: TaskKind, weight: torch.Tensor | None = None) -> Criterion:
    """Loss on head outputs: (weighted) cross-entropy on logits, or MSE on standardised ages."""
    if task is TaskKind.CLASSIFICATION:
        return lambda out, y: nn.functional.cross_entropy(out.float(), y.long(), weight=weight)
    return lambda out, y: nn.functional.mse_loss(
        out.float().squeeze(-1), (y.float() - model.target_mean) / model.target_std)


def param_groups(model: TransferResNet, lr: float, backbone_lr_factor: float) -> list[dict]:
    """The head at `lr`, the trainable backbone at `lr * backbone_lr_factor`."""
    groups = [{"params": list(model.head.parameters()), "lr": lr}]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_factor})
    return groups


@torch.no_grad()  # not inference_mode: the cached features feed the head's autograd graph
def extract_features(model: TransferResNet, images: np.ndarray, batch_size: int, device: torch.device,
                     precision: Precision, channels_last: bool) -> torch.Tensor:
    """The frozen backbone's features (N, feature_dim) as float32 on the CPU, computed once."""
    model.backbone.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = model_input(torch.from_numpy(np.asarray(images[start:start + batch_size])), device, channels_last)
        with autocast(device, precision):
            features.append(model.backbone(batch).float().cpu())
    return torch.cat(features) if features else torch.zeros(0, model.feature_dim)


def model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> normalised float batch on `device` (normalised there: 4x less to copy)."""
    x = to_model_input(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def outputs_from_features(model: TransferResNet, features: torch.Tensor) -> np.ndarray:
    """Class probabilities (N, C) or ages (N,) from cached features, as `predict` gives from images."""
    out = model.from_features(features.to(model.target_mean.device)).float().cpu()
    return (out.softmax(dim=1) if out.ndim == 2 else out).numpy()


def run_fingerprint(model_config: ModelConfig, settings: TrainConfig, spec: TaskSpec, seed: int,
                    train: SplitData, val: SplitData) -> str:
    """What must match for a checkpoint to be resumed: the settings that shape training, and the data."""
    shaping = {"seed": seed, "model": model_config.model_dump(mode="json"), "task": spec.model_dump(mode="json"),
               "train": settings.model_dump(mode="json", exclude={"resume"})}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for split in (train, val):
        digest.update(np.ascontiguousarray(split.images).tobytes())
        digest.update(np.ascontiguousarray(split.targets).tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Written beside `path` and renamed into place: a kill mid-write leaves the previous one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def target_scale(spec: TaskSpec, targets: np.ndarray) -> tuple[float, float]:
    """Mean and std the head's output is de-standardised with: the training ages, or (0, 1) for classes."""
    if spec.classification:
        return 0.0, 1.0
    return float(targets.mean()), float(targets.std() or 1.0)


def train_model(model_config: ModelConfig, settings: TrainConfig, spec: TaskSpec, seed: int,
                train: SplitData, val: SplitData, *, tracking_uri: str | None = None,
                on_epoch_end: Callable[[EpochResult], None] | None = None,
                checkpoint_dir: Path | None = None, feature_store: FeatureStore | None = None) -> TrainResult:
    """Train one model; returns it with its best validation weights loaded.

    `tracking_uri` is where `model.weights: mlflow:/...` source models are looked up.
    With `checkpoint_dir`, each epoch ends with an atomic checkpoint (model, optimizer,
    scheduler, early stopping and data-order state; augmentation needs no random state, see
    ImageDataset); a later call with the same settings and data resumes from it
    (`train.resume`) and ends with the same weights as an uninterrupted run. The checkpoint
    is removed once training finishes. (`head` fits take seconds and are not checkpointed;
    with `feature_store`, their one feature pass is shared by every call that has the same
    backbone and images.)
    """
    task = spec.kind
    device = select_device(settings.device)
    choice = training_precision(settings.precision, settings.channels_last, device.type, cpu_info(),
                                device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))
    log.info("precision %s, channels_last %s (%s)", choice.precision.value, choice.channels_last, choice.reason)
    # Everything below (and the checkpoint fingerprint) sees the precision actually used.
    settings = settings.model_copy(update={"precision": choice.precision, "channels_last": choice.channels_last})
    num_outputs, (mean, std) = spec.num_outputs, target_scale(spec, train.targets)
    with GLOBAL_RNG:
        seed_everything(seed)
        model, weights = build_model(model_config, task, num_outputs, mean, std, tracking_uri=tracking_uri)
    strategy, reason = resolve_freeze(model_config, len(train), weights.pretrained)
    log.info("backbone: %s; strategy %s (%s)", weights.describe(), strategy.value, reason)
    apply_freeze(model, strategy, model_config.frozen_stages)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    cached = strategy is FreezeStrategy.HEAD

    result = TrainResult(model=model, weights=weights, strategy=strategy, strategy_reason=reason,
                         device=str(device), metric_name=primary_metric(task)[0], best_epoch=0,
                         best_metric=float("nan"), cached_features=cached, precision=settings.precision.value,
                         precision_reason=choice.reason, channels_last=settings.channels_last)
    if cached:
        features = backbone_features(model, weights, model_config.arch, settings, feature_store)
        return _fit_head_on_features(settings, spec, model, train, val, result, on_epoch_end, features)
    augment = build_augmentation(settings.augment, train.images.shape[-1])
    dataset = ImageDataset(train, augment, seed)
    prepare = lambda images: model_input(images, device, settings.channels_last)  # noqa: E731
    forward: Callable[[torch.Tensor], torch.Tensor] = model.standardised
    if settings.compile and device.type == "cuda":
        forward = torch.compile(model.standardised)
    elif settings.compile:
        log.info("train.compile: ignored on %s (torch.compile is used on CUDA only)", device)
    validate = lambda: predict(model, val.images, settings.batch_size, device)  # noqa: E731

    weight = None
    if settings.class_balance is ClassBalance.WEIGHTED_LOSS:
        weight = class_weights(train.targets, num_outputs).to(device)
    criterion = make_criterion(model, task, weight)
    loader = make_loader(dataset, train.targets, settings.batch_size, seed, settings.num_workers,
                         settings.class_balance, num_outputs)
    # Discriminative rates protect pretrained features; a random backbone has none to protect.
    backbone_lr_factor = settings.backbone_lr_factor if weights.pretrained else 1.0
    optimizer = torch.optim.AdamW(param_groups(model, settings.lr, backbone_lr_factor),
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * len(loader))
    stopper = EarlyStopping(settings.patience, primary_metric(task)[1])
    best_state = copy.deepcopy(model.state_dict())
    warmup_epochs = settings.warmup_head_epochs

    fingerprint = run_fingerprint(model_config, settings, spec, seed, train, val)
    checkpoint = checkpoint_dir / f"train-{fingerprint[:16]}.pt" if checkpoint_dir else None
    start_epoch = 1
    if checkpoint and settings.resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        stopper = EarlyStopping(**saved["stopper"])
        best_state = saved["best_state"]
        result.best_epoch, result.best_metric = saved["best_epoch"], saved["best_metric"]
        result.history = [EpochResult(**epoch) for epoch in saved["history"]]
        loader.generator.set_state(saved["loader_generator"])
        start_epoch = result.resumed_from_epoch = saved["epoch"] + 1
        log.info("resumed from %s after epoch %d", checkpoint, saved["epoch"])

    for epoch in range(start_epoch, settings.epochs + 1):
        if stopper.should_stop:
            log.info("early stop after epoch %d: no %s gain for %d epochs", epoch - 1,
                     result.metric_name, stopper.stale_epochs)
            break
        # Gradual unfreezing: head only for the warm-up epochs, then the strategy's own freeze.
        phase = FreezeStrategy.HEAD if epoch <= warmup_epochs else strategy
        frozen = apply_freeze(model, phase, model_config.frozen_stages)
        set_train_mode(model, frozen)
        dataset.epoch = epoch
        loss, seen, data_seconds, compute_seconds = run_epoch(
            loader, prepare, forward, criterion, optimizer, scheduler, device, settings.precision,
            f"epoch {epoch}/{settings.epochs}")
        seconds = data_seconds + compute_seconds
        val_metric = compute_metrics(task, val.targets, validate(), spec.positive_index)[result.metric_name]
        epoch_result = EpochResult(epoch, loss / seen, val_metric, scheduler.get_last_lr()[0], seconds,
                                   seen / seconds, data_seconds, compute_seconds)
        result.history.append(epoch_result)
        if stopper.improved(val_metric):
            result.best_epoch, result.best_metric = epoch, val_metric
            best_state = copy.deepcopy(model.state_dict())
        if checkpoint:
            save_checkpoint(checkpoint, {
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "stopper": asdict(stopper), "best_state": best_state, "best_epoch": result.best_epoch,
                "best_metric": result.best_metric, "history": [asdict(e) for e in result.history],
                "loader_generator": loader.generator.get_state()})
        if on_epoch_end:
            on_epoch_end(epoch_result)
    model.load_state_dict(best_state)
    _hand_back(model)
    if checkpoint:
        checkpoint.unlink(missing_ok=True)
    return result


def _hand_back(model: TransferResNet) -> None:
    """The trained model as evaluation and export expect it: eval mode, contiguous, fp32."""
    model.to(memory_format=torch.contiguous_format)
    model.requires_grad_(True)
    model.eval()


def standardise_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features as float64 z-scores per dimension, with the centre and scale used."""
    x = features.double()
    centre, scale = x.mean(dim=0), x.std(dim=0)
    scale[~(scale > 1e-6)] = 1.0  # constant features (e.g. a ReLU channel that never fires)
    return (x - centre) / scale, centre, scale


def fit_linear_head(features: torch.Tensor, targets: torch.Tensor, task: TaskKind, num_outputs: int,
                    l2: float, weight: torch.Tensor | None = None) -> tuple[nn.Linear, float]:
    """The linear head minimising mean loss + l2/2 * ||W||^2 on (standardised) features.

    A convex problem, so L-BFGS in float64 goes to its optimum instead of following a
    learning-rate schedule that a small training set gives too few steps. Classification
    targets are class indices (cross-entropy, optionally class-weighted); regression
    targets are standardised ages (squared error). Returns the head and its training loss.
    """
    x = features.double()
    head = nn.Linear(x.shape[1], num_outputs, dtype=torch.float64)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if task is TaskKind.CLASSIFICATION:
        class_weight = None if weight is None else weight.double()
        data_loss = lambda out: nn.functional.cross_entropy(out, targets.long(), weight=class_weight)  # noqa: E731
    else:
        data_loss = lambda out: nn.functional.mse_loss(out.squeeze(-1), targets.double())  # noqa: E731
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=1000, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data_loss(head(x)) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        return head, float(data_loss(head(x)))


def feature_key(weights: WeightsInfo, arch: str, settings: TrainConfig, device: torch.device,
                images: np.ndarray) -> str:
    """What the frozen backbone's features depend on: its weights, the images, and how they are computed."""
    digest = hashlib.sha256(json.dumps([weights.name, weights.sha256, arch, settings.precision.value,
                                        settings.channels_last, device.type]).encode())
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def backbone_features(model: TransferResNet, weights: WeightsInfo, arch: str, settings: TrainConfig,
                      feature_store: FeatureStore | None) -> Callable[[SplitData], torch.Tensor]:
    """The frozen backbone's features of a split: computed, or read from `feature_store` when it has them."""
    device = model.target_mean.device

    def features(split: SplitData) -> torch.Tensor:
        compute = lambda: extract_features(model, split.images, settings.batch_size, device,  # noqa: E731
                                           settings.precision, settings.channels_last)
        if feature_store is None:
            return compute()
        return feature_store.get(feature_key(weights, arch, settings, device, split.images), compute)

    return features


def _fit_head_on_features(settings: TrainConfig, spec: TaskSpec, model: TransferResNet, train: SplitData,
                          val: SplitData, result: TrainResult, on_epoch_end: Callable[[EpochResult], None] | None,
                          features: Callable[[SplitData], torch.Tensor]) -> TrainResult:
    """`head`: features once, then one L-BFGS fit per `train.head_l2`; the best on validation is kept.

    The fit runs on standardised features and the scaling is folded into the returned
    head's weights, so the model is an ordinary backbone + Linear for evaluation and export.
    """
    task = spec.kind
    if settings.augment.enabled or settings.warmup_head_epochs:
        log.info("head strategy: features are computed once, so augmentation and warm-up are off")
    started = time.perf_counter()
    train_features, val_features = features(train), features(val)
    result.feature_seconds = time.perf_counter() - started
    log.info("cached %d train + %d val backbone features in %.1f s", len(train), len(val), result.feature_seconds)

    standardised, centre, scale = standardise_features(train_features)
    if task is TaskKind.CLASSIFICATION:
        targets = torch.from_numpy(train.targets)
        # Both balancing modes become class weights: a balanced sampler's expected loss is the weighted loss.
        weight = (None if settings.class_balance is ClassBalance.NONE
                  else class_weights(train.targets, model.head.out_features))
    else:
        targets = (torch.from_numpy(train.targets).double() - float(model.target_mean)) / float(model.target_std)
        weight = None
    best = EarlyStopping(patience=len(settings.head_l2), higher_is_better=primary_metric(task)[1])
    best_head = copy.deepcopy(model.head.state_dict())
    # Strongest regularisation first: a tie on validation keeps the simpler head.
    for index, l2 in enumerate(sorted(settings.head_l2, reverse=True), start=1):
        fit_started = time.perf_counter()
        head, loss = fit_linear_head(standardised, targets, task, model.head.out_features, l2, weight)
        with torch.no_grad():
            folded_weight = head.weight / scale
            model.head.weight.copy_(folded_weight)
            model.head.bias.copy_(head.bias - folded_weight @ centre)
        val_metric = compute_metrics(task, val.targets, outputs_from_features(model, val_features),
                                     spec.positive_index)[result.metric_name]
        seconds = time.perf_counter() - fit_started
        epoch = EpochResult(index, loss, val_metric, None, seconds, len(train) / seconds,
                            compute_seconds=seconds, head_l2=l2)
        result.history.append(epoch)
        if best.improved(val_metric):
            result.best_epoch, result.best_metric = index, val_metric
            best_head = copy.deepcopy(model.head.state_dict())
        if on_epoch_end:
            on_epoch_end(epoch)
    model.head.load_state_dict(best_head)
    log.info("head: L2 %g kept (val %s %.4f)", result.history[result.best_epoch - 1].head_l2,
             result.metric_name, result.best_metric)
    _hand_back(model)
    return result


def run_epoch(loader: DataLoader, prepare: Callable[[torch.Tensor], torch.Tensor],
              forward: Callable[[torch.Tensor], torch.Tensor], criterion: Criterion,
              optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
              device: torch.device, precision: Precision, description: str) -> tuple[float, int, float, float]:
    """One pass over `loader`: (summed loss, samples seen, seconds waiting for data, seconds computing)."""
    total_loss, seen, data_seconds, compute_seconds = 0.0, 0, 0.0, 0.0
    waiting_since = time.perf_counter()
    for inputs, targets in tqdm(loader, desc=description, leave=False, disable=None):
        ready = time.perf_counter()
        data_seconds += ready - waiting_since
        inputs, targets = prepare(inputs), targets.to(device)
        with autocast(device, precision):
            outputs = forward(inputs)
        loss = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(targets)  # .item() waits for the device: timings are real
        seen += len(targets)
        waiting_since = time.perf_counter()
        compute_seconds += waiting_since - ready
    return total_loss, seen, data_seconds, compute_seconds

