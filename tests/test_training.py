"""Training strategies on real BreastMNIST images at 64 px: cached-feature heads, discriminative
learning rates and gradual unfreezing, class balance, augmentation, bf16, resume, and trainings
side by side in threads."""

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision

import tasks.train
from configs import AugmentConfig, ClassBalance, FreezeStrategy, ModelConfig, PipelineConfig, Precision, TaskKind
from models.resnet import apply_freeze, build_model
from tasks.evaluate import compute_metrics, predict
from tasks.preprocess import SplitData
from tasks.train import (ImageDataset, build_augmentation, class_weights, extract_features, fit_linear_head,
                         make_loader, param_groups, standardise_features, train_model)
from tests.test_train_evaluate import breast_splits, config_for, fit  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A ResNet-18 state dict on disk, standing in for a site's pretrained source model."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "source.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def configured(tmp_path, model: dict | None = None, **train) -> PipelineConfig:
    base = config_for(tmp_path, "classification", **train)
    return base.model_copy(update={"model": ModelConfig(**model)}) if model else base


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_head_trains_on_cached_features_and_gives_the_same_model(tmp_path, breast_splits, backbone_file):
    # fp32 features, as `predict` computes them below: under `auto` a CPU with native bf16 caches
    # bf16-autocast features, whose validation metric then differs from fp32's in the last pairs.
    config = configured(tmp_path, {"weights": str(backbone_file), "freeze": "head"}, head_l2=[0.01, 1.0, 100.0],
                        precision="fp32")
    result = fit(config, breast_splits["train"], breast_splits["val"])
    assert result.cached_features and result.strategy.value == "head" and result.feature_seconds > 0
    # One fit per L2 strength, strongest first; the best on validation is the one kept.
    assert [e.head_l2 for e in result.history] == [100.0, 1.0, 0.01]
    assert result.best_metric == max(e.val_metric for e in result.history)
    reference, _ = build_model(ModelConfig(weights=str(backbone_file)), TaskKind.CLASSIFICATION, 2)
    for key, value in backbone_state(reference).items():  # backbone, BatchNorm statistics included, untouched
        assert torch.equal(result.model.backbone.state_dict()[key], value), key
    assert not torch.equal(result.model.head.weight, reference.head.weight)
    # The returned model (backbone + trained head) scores the val images as the cached run did.
    outputs = predict(result.model, breast_splits["val"].images, 16)
    auc = compute_metrics(TaskKind.CLASSIFICATION, breast_splits["val"].targets, outputs)["roc_auc"]
    assert auc == pytest.approx(result.best_metric, abs=1e-6)


@pytest.fixture(scope="module")
def standardised_features(breast_splits, backbone_file):
    model, _ = build_model(ModelConfig(weights=str(backbone_file)), TaskKind.CLASSIFICATION, 2)
    features = extract_features(model, breast_splits["train"].images, 64, torch.device("cpu"),
                                Precision.FP32, channels_last=False)
    return standardise_features(features)[0]


def test_head_fit_reaches_the_logistic_regression_optimum(standardised_features, breast_splits):
    from sklearn.linear_model import LogisticRegression

    targets = breast_splits["train"].targets
    l2, n = 0.1, len(targets)
    head, _ = fit_linear_head(standardised_features, torch.from_numpy(targets), TaskKind.CLASSIFICATION, 2, l2)
    with torch.no_grad():
        ours = head(standardised_features).softmax(1)[:, 1].numpy()
    # Two softmax rows, each penalised, are binary logistic regression with half the L2 strength:
    # mean loss + l2/4 * ||w||^2, which is sklearn's sum loss + ||w||^2 / (2C) at C = 2 / (l2 * n).
    reference = LogisticRegression(C=2 / (l2 * n), tol=1e-10, max_iter=10_000).fit(standardised_features, targets)
    assert np.abs(ours - reference.predict_proba(standardised_features)[:, 1]).max() < 1e-4


def test_head_fit_for_ages_is_ridge_regression(standardised_features):
    from sklearn.linear_model import Ridge

    ages = torch.from_numpy(np.random.default_rng(0).normal(size=len(standardised_features)))  # z-scored
    l2, n = 0.5, len(ages)
    head, _ = fit_linear_head(standardised_features, ages, TaskKind.REGRESSION, 1, l2)
    with torch.no_grad():
        ours = head(standardised_features).squeeze(-1).numpy()
    # mean squared error + l2/2 * ||w||^2 is Ridge's sum of squares + alpha * ||w||^2 at alpha = n * l2 / 2.
    reference = Ridge(alpha=n * l2 / 2).fit(standardised_features, ages)
    assert np.abs(ours - reference.predict(standardised_features)).max() < 1e-5


def test_backbone_learns_at_a_fraction_of_the_head_rate(backbone_file):
    model, _ = build_model(ModelConfig(weights=str(backbone_file)), TaskKind.CLASSIFICATION, 2)
    apply_freeze(model, FreezeStrategy.PARTIAL, frozen_stages=3)
    head, backbone = param_groups(model, lr=1e-3, backbone_lr_factor=0.1)
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.layer4.parameters()}


def test_warmup_epochs_train_the_head_only_then_unfreeze(tmp_path, breast_splits, backbone_file):
    config = configured(tmp_path, {"weights": str(backbone_file), "freeze": "full"}, epochs=2,
                        warmup_head_epochs=1, patience=5)
    reference = backbone_state(build_model(ModelConfig(weights=str(backbone_file)), TaskKind.CLASSIFICATION, 2)[0])
    changed_after = {}

    def inspect_checkpoint(epoch):  # the checkpoint holds the weights as they are after this epoch
        saved = torch.load(next((tmp_path / "ckpt").glob("train-*.pt")), weights_only=True)
        changed_after[epoch.epoch] = {k for k, v in reference.items()
                                      if not torch.equal(saved["model"][f"backbone.{k}"], v)}
        head_group, backbone_group = saved["optimizer"]["param_groups"]
        assert backbone_group["lr"] == pytest.approx(0.1 * head_group["lr"])  # backbone_lr_factor default

    result = fit(config, breast_splits["train"], breast_splits["val"], on_epoch_end=inspect_checkpoint,
                         checkpoint_dir=tmp_path / "ckpt")
    assert not result.cached_features
    # Warm-up: frozen BatchNorm stays in eval mode, so not even its running statistics move.
    assert changed_after[1] == set()
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight"} <= changed_after[2]


def test_class_weights_are_inverse_frequency():
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    with pytest.raises(ValueError, match="class index"):
        class_weights(np.array([0, 0]), 2)


def test_balanced_sampler_draws_classes_equally(breast_splits):
    targets = breast_splits["train"].targets
    minority = min(np.bincount(targets.astype(int)))
    assert minority < len(targets) / 3  # the real split is imbalanced
    dataset = torch.utils.data.TensorDataset(torch.arange(len(targets)))
    loader = make_loader(dataset, targets, 8, seed=0, num_workers=0,
                         balance=ClassBalance.BALANCED_SAMPLER, num_classes=2)
    drawn = np.concatenate([np.concatenate([targets[batch[0].numpy()] for batch in loader]) for _ in range(25)])
    assert abs(drawn.mean() - 0.5) < 0.05


def test_class_balance_is_refused_for_regression(tmp_path):
    with pytest.raises(ValueError, match="class_balance"):
        config_for(tmp_path, "regression", class_balance="weighted_loss")


def test_augmentation_is_small_uint8_and_flips_only_when_allowed(breast_splits):
    split = breast_splits["train"]
    augment_config = AugmentConfig(enabled=True)
    augment = build_augmentation(augment_config, 64)
    names = [type(step).__name__ for step in augment.transforms]
    assert names == ["RandomResizedCrop", "RandomAffine"]
    assert "RandomHorizontalFlip" in [type(s).__name__ for s in
                                      build_augmentation(AugmentConfig(enabled=True, allow_flip=True), 64).transforms]
    assert build_augmentation(AugmentConfig(enabled=False), 64) is None
    torch.manual_seed(0)
    image, _ = ImageDataset(split, augment)[0]
    original, _ = ImageDataset(split)[0]
    assert image.dtype == torch.uint8 and image.shape == original.shape == (64, 64)
    assert not torch.equal(image, original)
    assert torch.equal(original, torch.from_numpy(split.images[0]))


def test_bf16_and_channels_last_train_and_hand_back_an_fp32_model(tmp_path, breast_splits, backbone_file):
    config = configured(tmp_path, {"weights": str(backbone_file), "freeze": "partial", "frozen_stages": 3},
                        epochs=1, precision="bf16", channels_last=True)
    result = fit(config, breast_splits["train"], breast_splits["val"])
    assert result.precision == "bf16" and np.isfinite(result.history[0].train_loss)
    assert result.model.head.weight.dtype == torch.float32
    assert result.model.backbone.conv1.weight.is_contiguous()
    epoch = result.history[0]
    assert epoch.data_seconds > 0 and epoch.compute_seconds > 0
    assert epoch.seconds == pytest.approx(epoch.data_seconds + epoch.compute_seconds)


def test_bf16_features_are_close_to_fp32(breast_splits, backbone_file):
    model, _ = build_model(ModelConfig(weights=str(backbone_file)), TaskKind.CLASSIFICATION, 2)
    images = breast_splits["val"].images[:8]
    fp32 = extract_features(model, images, 8, torch.device("cpu"), Precision.FP32, False)
    bf16 = extract_features(model, images, 8, torch.device("cpu"), Precision.BF16, True)
    assert fp32.shape == (8, 512) and bf16.dtype == torch.float32
    assert torch.allclose(bf16, fp32, rtol=0.1, atol=0.05 * float(fp32.abs().mean()))


class Interrupted(Exception):
    pass


def test_killed_run_resumes_from_its_checkpoint_and_ends_identical(tmp_path, breast_splits, backbone_file):
    config = configured(tmp_path, {"weights": str(backbone_file), "freeze": "full"}, epochs=2, patience=5,
                        augment={"enabled": True}, class_balance="balanced_sampler", warmup_head_epochs=1)
    train, val = breast_splits["train"], breast_splits["val"]
    uninterrupted = fit(config, train, val, checkpoint_dir=tmp_path / "a")
    assert uninterrupted.resumed_from_epoch == 0 and not list((tmp_path / "a").glob("*.pt"))

    def kill_after_first_epoch(epoch):
        if epoch.epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, train, val, on_epoch_end=kill_after_first_epoch, checkpoint_dir=tmp_path / "b")
    assert len(list((tmp_path / "b").glob("train-*.pt"))) == 1
    resumed = fit(config, train, val, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == len(uninterrupted.history) == 2
    for key in ("val_metric", "train_loss", "lr"):
        assert [getattr(e, key) for e in resumed.history] == pytest.approx(
            [getattr(e, key) for e in uninterrupted.history], abs=1e-6), key
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[key].float(), value.float(), atol=1e-6), key


class CountingStore:
    """A FeatureStore in memory that counts the feature passes it had to run."""

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}
        self.passes = 0

    def get(self, key, compute):
        if key not in self.features:
            self.features[key] = compute()
            self.passes += 1
        return self.features[key]


def test_head_runs_share_one_feature_pass_through_a_store(tmp_path, breast_splits, backbone_file):
    store = CountingStore()
    train, val = breast_splits["train"], breast_splits["val"]
    strong = configured(tmp_path, {"weights": str(backbone_file), "freeze": "head"}, head_l2=[10.0])
    weak = configured(tmp_path, {"weights": str(backbone_file), "freeze": "head"}, head_l2=[0.01], batch_size=8)
    fit(strong, train, val, feature_store=store)
    shared = fit(weak, train, val, feature_store=store)
    assert store.passes == 2  # the train and the val features, once for both runs
    alone = fit(weak, train, val)
    assert torch.allclose(shared.model.head.weight, alone.model.head.weight, atol=1e-5)
    assert shared.best_metric == pytest.approx(alone.best_metric, abs=1e-6)
    fit(weak, SplitData(train.images[:20], train.targets[:20]), val, feature_store=store)
    assert store.passes == 3  # other images: a new pass for them, the val features reused


def test_trainings_in_parallel_threads_end_as_they_do_alone(tmp_path, breast_splits):
    # Tuning runs trials side by side in threads of one process, which share torch's global
    # generator: each must still train the weights its seed gives alone.
    config = configured(tmp_path, {"weights": "none", "freeze": "full"}, epochs=2, precision="fp32",
                        augment={"enabled": True})
    train, val = breast_splits["train"], breast_splits["val"]

    def run(seed):
        return train_model(config.model, config.train, config.task_spec, seed, train, val).model.state_dict()

    alone = {seed: run(seed) for seed in (0, 1)}
    with ThreadPoolExecutor(2) as pool:
        together = dict(zip((0, 1), pool.map(run, (0, 1))))
    for seed in (0, 1):
        for key, value in alone[seed].items():
            assert torch.equal(together[seed][key], value), (seed, key)


def test_a_worker_forked_while_another_thread_augments_can_still_augment():
    # DataLoader workers are forked; one forked while a parallel trial held the lock gets a free one.
    def child(answer):
        answer.put(tasks.train.GLOBAL_RNG.acquire(timeout=5))

    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    with tasks.train.GLOBAL_RNG:
        worker = context.Process(target=child, args=(answer,))
        worker.start()
        acquired = answer.get(timeout=30)
    worker.join(timeout=30)
    assert acquired is True
