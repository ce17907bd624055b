import hashlib

import pytest
import torch
import torchvision

from configs import FreezeStrategy, ModelConfig, TaskKind
from models.resnet import (WeightsError, apply_freeze, build_model, resolve_freeze, set_train_mode)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME: ImageNet weights are not cached (and cannot be downloaded here)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def saved_backbone(tmp_path, seed=0):
    torch.manual_seed(seed)
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "backbone.pt"
    torch.save(reference.state_dict(), path)
    return path, reference, hashlib.sha256(path.read_bytes()).hexdigest()


def test_heads_replace_fc_for_each_task():
    classifier, info = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)
    assert not info.pretrained and info.describe().startswith("random initialisation")
    assert classifier(torch.zeros(3, 3, 224, 224)).shape == (3, 2)
    regressor, _ = build_model(ModelConfig(arch="resnet34", weights="none"), TaskKind.REGRESSION, 1,
                               target_mean=50.0, target_std=10.0)
    regressor.head.weight.data.zero_()
    regressor.head.bias.data.fill_(1.5)  # z = 1.5 -> 50 + 1.5 * 10 years
    assert regressor(torch.zeros(2, 3, 224, 224)).tolist() == pytest.approx([65.0, 65.0])


def test_local_checkpoint_loads_into_backbone_and_checks_sha256(tmp_path):
    path, reference, digest = saved_backbone(tmp_path)
    model, info = build_model(ModelConfig(weights=str(path), weights_sha256=digest), TaskKind.CLASSIFICATION, 2)
    assert info.pretrained and info.sha256 == digest and info.name == "backbone.pt"
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(WeightsError, match="has sha256"):
        build_model(ModelConfig(weights=str(path), weights_sha256="0" * 64), TaskKind.CLASSIFICATION, 2)
    with pytest.raises(WeightsError, match="file not found"):
        build_model(ModelConfig(weights=str(tmp_path / "nope.pt")), TaskKind.CLASSIFICATION, 2)


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    path, _, _ = saved_backbone(tmp_path)
    with pytest.raises(WeightsError, match="does not fit resnet50"):
        build_model(ModelConfig(arch="resnet50", weights=str(path)), TaskKind.CLASSIFICATION, 2)


def test_imagenet_weights_come_from_the_torch_home_cache(tmp_path, torch_home):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    # A stand-in file under the real cache name: these tests cannot download ImageNet weights.
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    model, info = build_model(ModelConfig(weights="imagenet"), TaskKind.CLASSIFICATION, 2)
    assert info.pretrained and info.name == "ResNet18_Weights.IMAGENET1K_V1"
    assert info.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_imagenet_unavailable_offline_falls_back_to_random_init_and_says_so(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)  # no network in CI either
    _, info = build_model(ModelConfig(weights="imagenet"), TaskKind.CLASSIFICATION, 2)
    assert not info.pretrained and info.name == "none"


@pytest.mark.parametrize("requested, n_train, pretrained, expected", [
    (FreezeStrategy.AUTO, 500, True, FreezeStrategy.HEAD),
    (FreezeStrategy.AUTO, 5000, True, FreezeStrategy.FULL),
    (FreezeStrategy.AUTO, 500, False, FreezeStrategy.FULL),
    (FreezeStrategy.HEAD, 500, False, FreezeStrategy.FULL),
    (FreezeStrategy.PARTIAL, 500, True, FreezeStrategy.PARTIAL),
])
def test_strategy_choice(requested, n_train, pretrained, expected):
    strategy, reason = resolve_freeze(ModelConfig(freeze=requested, auto_full_threshold=1000), n_train, pretrained)
    assert strategy is expected and reason


def test_freezing_keeps_frozen_parts_fixed_and_batchnorm_in_eval():
    model, _ = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)
    frozen = apply_freeze(model, FreezeStrategy.PARTIAL, frozen_stages=2)
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad and name.startswith("backbone")}
    assert trainable == {"layer3", "layer4"}
    assert all(p.requires_grad for p in model.head.parameters())
    set_train_mode(model, frozen)
    assert not model.backbone.bn1.training and not model.backbone.layer2[0].bn1.training
    assert model.backbone.layer3[0].bn1.training and model.head.training
    head_only = apply_freeze(build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0],
                             FreezeStrategy.HEAD, 0)
    assert len(head_only) == 5
