"""Tests of the CIFAR model zoo and its checkpoint loading (tune_kd.models)."""

from __future__ import annotations

import argparse
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tune_kd import models
from tune_kd.models import (
    arch_from_path,
    archs_matching,
    create,
    family,
    load_checkpoint,
    names,
)

ALL_NAMES = [
    *(f"resnet{d}" for d in (8, 14, 20, 32, 38, 44, 56, 110, 116)),
    "resnet14x2",
    "resnet38x2",
    "resnet110x2",
    "resnet8x4",
    "resnet14x4",
    "resnet32x4",
    "resnet38x4",
    "ResNet50",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "MobileNetV2_1_0",
    "ShuffleV1",
    "ShuffleV2",
    "ShuffleV2_1_5",
]

# Measured on the RepDistiller / SimKD implementations, 100 classes.
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet116": 1_833_780,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet38x2": 2_255_604,
    "resnet110x2": 6_911_220,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "MobileNetV2": 812_836,
    "MobileNetV2_1_0": 2_353_060,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ShuffleV2_1_5": 2_580_548,
}

# name -> (number of features, shape of features[-2], length of features[-1]) at 32 pixels
FEATURE_LAYOUT = {
    "resnet8x4": (5, (256, 8, 8), 256),
    "resnet32x4": (5, (256, 8, 8), 256),
    "resnet38x2": (5, (128, 8, 8), 128),
    "ResNet50": (6, (2048, 4, 4), 2048),
    "wrn_40_2": (5, (128, 8, 8), 128),
    "vgg8": (6, (512, 4, 4), 512),
    "MobileNetV2": (6, (160, 2, 2), 1280),
    "MobileNetV2_1_0": (6, (320, 2, 2), 1280),
    "ShuffleV1": (5, (960, 4, 4), 960),
    "ShuffleV2": (5, (464, 4, 4), 1024),
}


def _meta(name: str, num_classes: int = 100) -> nn.Module:
    with torch.device("meta"):
        return create(name, num_classes=num_classes)


def _trained_like(name: str, num_classes: int = 100, seed: int = 0) -> nn.Module:
    """A model whose BN statistics and affine parameters are not the defaults, so that
    eval-mode outputs depend on every entry of its state dict."""
    torch.manual_seed(seed)
    model = create(name, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _outputs_equal(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ---------------------------------------------------------------- architectures


def test_registry_holds_exactly_the_zoo():
    assert sorted(names()) == sorted(ALL_NAMES)


@pytest.mark.parametrize(("name", "count"), PARAM_COUNTS.items())
def test_parameter_count_matches_reference(name, count):
    assert sum(p.numel() for p in _meta(name).parameters()) == count


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_features_and_classifier(name):
    torch.manual_seed(0)
    model = create(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features, feat_logits = model(x, is_feat=True)
        reclassified = model.get_classifier()(features[-1])
    assert logits.shape == (2, 100)
    assert torch.equal(feat_logits, logits)
    assert features[-2].dim() == 4
    assert features[-1].shape[0] == 2
    assert features[-1].dim() == 2
    assert torch.allclose(reclassified, logits, atol=1e-6)


@pytest.mark.parametrize(("name", "layout"), FEATURE_LAYOUT.items())
def test_feature_layout(name, layout):
    count, last_map, pooled = layout
    features, logits = _meta(name)(torch.empty(2, 3, 32, 32, device="meta"), is_feat=True)
    assert len(features) == count
    assert tuple(features[-2].shape[1:]) == last_map
    assert tuple(features[-1].shape) == (2, pooled)
    assert tuple(logits.shape) == (2, 100)


@pytest.mark.parametrize("name", ["wrn_16_1", "ShuffleV1", "MobileNetV2", "vgg8"])
def test_training_backward_through_all_features(name):
    """An in-place change to a returned feature that autograd saved would fail here."""
    model = create(name).train()
    features, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    loss = logits.sum() + sum(f.square().mean() for f in features)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_num_classes_sets_the_classifier():
    for name in ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"):
        clf = _meta(name, num_classes=10).get_classifier()
        assert [m.out_features for m in clf.modules() if isinstance(m, nn.Linear)] == [10]


def test_vgg_uses_pool3_only_for_64_pixel_inputs():
    model = create("vgg8").eval()
    with torch.no_grad():
        f32, _ = model(torch.randn(1, 3, 32, 32), is_feat=True)
        f64, _ = model(torch.randn(1, 3, 64, 64), is_feat=True)
    assert f32[-2].shape[-1] == 4
    assert f64[-2].shape[-1] == 4


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_channels_last_gives_the_same_outputs(name):
    model = create(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["wrn_16_1", "vgg8", "ShuffleV2"])
def test_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    model = create(name).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = compiled(x, is_feat=True)
        assert torch.allclose(logits, model(x), atol=1e-6)
    assert len(features) >= 5


def test_initialisation_follows_the_reference_schemes():
    torch.manual_seed(0)
    resnet = create("resnet32x4")
    conv = resnet.layer3[0].conv2  # 256 -> 256, 3x3: fan_out 2304
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.05)
    mobile = create("MobileNetV2")
    linear = mobile.get_classifier()[0]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not linear.bias.any()
    vgg = create("vgg8")
    assert not vgg.block0[0].bias.any()
    assert vgg.get_classifier().weight.std().item() == pytest.approx(0.01, rel=0.05)
    wrn = create("wrn_16_2")
    assert not wrn.fc.bias.any()


# ---------------------------------------------------------------- registry


def test_names_filters_with_wildcards():
    resnets = names("resnet*")
    assert "resnet8" in resnets
    assert "resnet32x4" in resnets
    assert all(n.startswith("resnet") for n in resnets)
    assert "ResNet50" not in resnets  # case-sensitive, like create()
    assert names("wrn_40_*") == ["wrn_40_1", "wrn_40_2"]
    assert names("nothing*") == []


def test_family():
    assert family("resnet32x4") == "resnet"
    assert family("ResNet50") == "resnet"
    assert family("wrn_40_2") == "wrn"
    assert family("vgg13") == "vgg"
    assert family("MobileNetV2_1_0") == "mobilenetv2"
    assert family("ShuffleV2_1_5") == "shufflenet"
    assert {family(n) for n in names()} == {"resnet", "wrn", "vgg", "mobilenetv2", "shufflenet"}


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet8x5'; did you mean .*resnet8x4"):
        create("resnet8x5")
    with pytest.raises(ValueError, match=r"unknown model 'wrn_40_3'.*wrn_40_2"):
        family("wrn_40_3")


def test_register_refuses_a_duplicate_name():
    def resnet8(num_classes: int = 100) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'resnet8' is already registered"):
        models.register("resnet")(resnet8)
    with pytest.raises(ValueError, match="'wrn_40_2' is already registered"):
        models.register("wrn", name="wrn_40_2")(resnet8)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("save/models/resnet32x4_vanilla/ckpt_epoch_240.pth", "resnet32x4"),
        ("resnet8x4_vanilla/ckpt_epoch_240.pth", "resnet8x4"),
        ("wrn_40_2_vanilla/ckpt_epoch_240.pth", "wrn_40_2"),
        ("wrn_40_1_vanilla/ckpt_epoch_240.pth", "wrn_40_1"),
        ("MobileNetV2_1_0_vanilla/ckpt_epoch_240.pth", "MobileNetV2_1_0"),
        ("MobileNetV2_vanilla/ckpt_epoch_240.pth", "MobileNetV2"),
        ("ShuffleV2_1_5_vanilla/x.pth", "ShuffleV2_1_5"),
        ("vgg13_vanilla/vgg13_best.pth", "vgg13"),
        ("resnet110/ckpt_epoch_240.pth", "resnet110"),
        (
            "S:resnet8x4_T:resnet32x4_cifar100_simkd_r:0.0_a:0.0_b:1.0_1/resnet8x4_best.pth",
            "resnet8x4",
        ),
        ("S:vgg8_T:vgg13_cifar100_kd_r:0.1_a:0.9_b:0.0_1/ckpt_epoch_240.pth", "vgg8"),
        ("checkpoints/resnet32x4_best.pth", "resnet32x4"),
        ("checkpoints/ckpt_epoch_240.pth", None),
        ("resnet8x5_vanilla/ckpt.pth", None),
        ("resnet32x4extra/ckpt.pth", None),
    ],
)
def test_arch_from_path(path, expected):
    assert arch_from_path(path) == expected


def test_archs_matching_tells_wrn_40_2_from_resnet38x2():
    # Same widths and depth; the ResNet has BN in its projections, the WRN a final BN.
    wrn = _meta("wrn_40_2").state_dict()
    resnet = _meta("resnet38x2").state_dict()
    assert archs_matching(wrn) == ["wrn_40_2"]
    assert archs_matching(resnet) == ["resnet38x2"]
    assert archs_matching(_meta("wrn_40_2", num_classes=10).state_dict()) == ["wrn_40_2"]
    assert archs_matching({"foo.weight": torch.zeros(3, 3)}) == []
    assert archs_matching({f"module.{k}": v for k, v in wrn.items()}) == ["wrn_40_2"]


def test_archs_matching_identifies_every_model():
    for name in ALL_NAMES:
        assert archs_matching(_meta(name).state_dict()) == [name]


# ---------------------------------------------------------------- checkpoints


def _save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_checkpoint_round_trip_with_inferred_name(tmp_path):
    teacher = _trained_like("resnet8x4")
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    path = _save(
        {
            "model": teacher.state_dict(),
            "epoch": 240,
            "best_acc": torch.tensor(73.1),
            "optimizer": optimizer.state_dict(),
        },
        tmp_path / "resnet8x4_vanilla" / "ckpt_epoch_240.pth",
    )
    loaded = load_checkpoint(path)
    assert type(loaded) is type(teacher)
    assert not loaded.training
    assert _outputs_equal(loaded, teacher)


def test_bare_state_dict_is_recognised_by_its_keys(tmp_path):
    model = _trained_like("resnet8", num_classes=10)
    path = _save(model.state_dict(), tmp_path / "weights.pth")
    loaded = load_checkpoint(path)
    assert loaded.get_classifier().out_features == 10
    assert _outputs_equal(loaded, model)


def test_dataparallel_prefix_is_stripped(tmp_path):
    model = _trained_like("ShuffleV2")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = _save({"model": state, "epoch": 1}, tmp_path / "dp.pth")
    assert _outputs_equal(load_checkpoint(path, name="ShuffleV2"), model)


def test_wrn_folder_and_num_classes_are_inferred(tmp_path):
    model = _trained_like("wrn_40_2", num_classes=10)
    path = _save({"model": model.state_dict()}, tmp_path / "wrn_40_2_vanilla" / "last.pth")
    loaded = load_checkpoint(path)
    assert family("wrn_40_2") == "wrn"
    assert loaded.fc.out_features == 10
    assert _outputs_equal(loaded, model)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    model = _trained_like("resnet8")
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    path = _save({"model": state}, tmp_path / "resnet8_vanilla" / "old.pth")
    assert _outputs_equal(load_checkpoint(path), model)


def test_wrong_architecture_names_missing_keys_and_lookalike(tmp_path):
    path = _save({"model": create("resnet8").state_dict()}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, name="resnet20")
    message = str(info.value)
    assert "does not fit resnet20" in message
    assert "missing keys layer1.1." in message
    assert "look like resnet8" in message


def test_shape_mismatch_is_reported(tmp_path):
    path = _save(create("resnet8x4").state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, name="resnet8")
    message = str(info.value)
    assert "shape mismatches conv1.weight: checkpoint (32, 3, 3, 3), model (16, 3, 3, 3)" in message
    assert "look like resnet8x4" in message


def test_misleading_folder_is_not_silently_overridden(tmp_path):
    path = _save(
        {"model": create("resnet8").state_dict()}, tmp_path / "resnet32x4_vanilla" / "c.pth"
    )
    with pytest.raises(ValueError, match=r"does not fit resnet32x4.*look like resnet8"):
        load_checkpoint(path)


def test_unknown_name_in_load_checkpoint(tmp_path):
    path = _save(create("resnet8").state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"unknown model 'resnet8x5'.*resnet8x4"):
        load_checkpoint(path, name="resnet8x5")


def test_uninferable_architecture_asks_for_name(tmp_path):
    path = _save({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="pass name="):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "resnet8_vanilla" / "nope.pth")


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "resnet8_vanilla" / "ckpt.pth"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create ``marker``: a stand-in for code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_python_objects_in_a_checkpoint_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"
    path = _save(
        {"model": create("resnet8").state_dict(), "extra": _Payload(marker)},
        tmp_path / "resnet8_vanilla" / "ckpt.pth",
    )
    with pytest.raises(ValueError, match=r"Python objects \(\S*open\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_of_an_object_is_refused(tmp_path):
    path = tmp_path / "resnet8_vanilla" / "ckpt.pth"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(argparse.Namespace(lr=0.05), protocol=2))
    with pytest.raises(ValueError, match=r"Python objects \(argparse\.Namespace\)"):
        load_checkpoint(path)


def test_a_torch_file_that_is_not_a_state_dict(tmp_path):
    path = _save([1, 2, 3], tmp_path / "resnet8_vanilla" / "ckpt.pth")
    with pytest.raises(ValueError, match=r"not a model checkpoint.*found a list"):
        load_checkpoint(path)
    path = _save({"epoch": 3, "acc": 1.0}, tmp_path / "resnet8_vanilla" / "ckpt2.pth")
    with pytest.raises(ValueError, match=r"not a model checkpoint.*epoch, acc"):
        load_checkpoint(path)
