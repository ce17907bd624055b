"""Fine-tune: one readable training loop (AdamW, cosine schedule, early stopping)."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from configs import FreezeStrategy, PipelineConfig, TaskKind
from models.resnet import TransferResNet, WeightsInfo, apply_freeze, build_model, resolve_freeze, set_train_mode
from tasks.evaluate import compute_metrics, predict, primary_metric
from tasks.preprocess import SplitData, to_model_input

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.asarray(self.split.images[index])), torch.tensor(self.split.targets[index])


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_metric: float
    lr: float
    seconds: float
    images_per_second: float


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


def make_loader(split: SplitData, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(split), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=num_workers, drop_last=False)


def loss_fn(model: TransferResNet, task: TaskKind) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on logits, or MSE on standardised ages."""
    if task is TaskKind.CLASSIFICATION:
        return lambda x, y: nn.functional.cross_entropy(model.standardised(x), y.long())
    return lambda x, y: nn.functional.mse_loss(
        model.standardised(x).squeeze(-1), (y.float() - model.target_mean) / model.target_std)


def train_model(config: PipelineConfig, train: SplitData, val: SplitData,
                on_epoch_end: Callable[[EpochResult], None] | None = None) -> TrainResult:
    """Train from config; returns the model with its best validation weights loaded."""
    seed_everything(config.seed)
    task = config.data.task
    device = select_device(config.train.device)
    if task is TaskKind.CLASSIFICATION:
        num_outputs, mean, std = len(config.data.label_names), 0.0, 1.0
    else:
        num_outputs, mean, std = 1, float(train.targets.mean()), float(train.targets.std() or 1.0)
    model, weights = build_model(config.model, task, num_outputs, mean, std)
    strategy, reason = resolve_freeze(config.model, len(train), weights.pretrained)
    log.info("backbone: %s; strategy %s (%s)", weights.describe(), strategy.value, reason)
    frozen = apply_freeze(model, strategy, config.model.frozen_stages)
    model.to(device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay)
    loader = make_loader(train, config.train.batch_size, True, config.seed, config.train.num_workers)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs * len(loader))
    compute_loss = loss_fn(model, task)
    metric_name, higher_is_better = primary_metric(task)

    result = TrainResult(model=model, weights=weights, strategy=strategy, strategy_reason=reason,
                         device=str(device), metric_name=metric_name, best_epoch=0, best_metric=float("nan"))
    stopper = EarlyStopping(config.train.patience, higher_is_better)
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, config.train.epochs + 1):
        set_train_mode(model, frozen)
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        for images, targets in tqdm(loader, desc=f"epoch {epoch}/{config.train.epochs}", leave=False,
                                    disable=None):
            images, targets = to_model_input(images).to(device), targets.to(device)
            loss = compute_loss(images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(targets)
            seen += len(targets)
        seconds = time.perf_counter() - started
        val_metric = validation_metric(model, val, config, device)
        epoch_result = EpochResult(epoch, total_loss / seen, val_metric, scheduler.get_last_lr()[0],
                                   seconds, seen / seconds)
        result.history.append(epoch_result)
        if on_epoch_end:
            on_epoch_end(epoch_result)
        if stopper.improved(val_metric):
            result.best_epoch, result.best_metric = epoch, val_metric
            best_state = copy.deepcopy(model.state_dict())
        elif stopper.should_stop:
            log.info("early stop at epoch %d: no %s gain for %d epochs", epoch, metric_name, stopper.stale_epochs)
            break
    model.load_state_dict(best_state)
    model.eval()
    return result


def validation_metric(model: TransferResNet, split: SplitData, config: PipelineConfig,
                      device: torch.device) -> float:
    """The primary metric (AUC or MAE) of `model` on `split`."""
    outputs = predict(model, split.images, config.train.batch_size, device)
    metrics = compute_metrics(config.data.task, split.targets, outputs, config.data.positive_index)
    return metrics[primary_metric(config.data.task)[0]]
