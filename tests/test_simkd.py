"""SimKD's projector, alignment and placements, the distillation losses, and the methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_cases, golden_tensor
from torch import nn

from tune_kd import distillers, losses, models
from tune_kd.config import Config, resolve
from tune_kd.distillers.simkd import (
    SimKD,
    align,
    classify,
    default_weights,
    make_projector,
    stage_pairs,
)


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_default_projector_is_the_official_bottleneck():
    projector = SimKD(student_channels=64, teacher_channels=256, factor=2)
    layers = list(projector.transfer)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    shapes = [(c.in_channels, c.out_channels, c.kernel_size) for c in convs(projector)]
    assert shapes == [(64, 128, (1, 1)), (128, 128, (3, 3)), (128, 256, (1, 1))]
    assert all(c.bias is None for c in convs(projector))
    assert convs(projector)[1].padding == (1, 1)
    # Attribute names as in the official code, so its projector weights load.
    assert "transfer.0.weight" in projector.state_dict()


@pytest.mark.parametrize(
    ("design", "kernels", "groups"),
    [
        ("1x1", [1], [1]),
        ("1x1-1x1", [1, 1], [1, 1]),
        ("1x1-dw3x3-1x1", [1, 3, 1], [1, 64, 1]),
        ("1x1-3x3-1x1", [1, 3, 1], [1, 1, 1]),
    ],
)
def test_projector_designs_of_the_ablation(design, kernels, groups):
    projector = make_projector(design, 32, 256, factor=4)
    layers = convs(projector)
    assert [c.kernel_size[0] for c in layers] == kernels
    assert [c.groups for c in layers] == groups
    assert layers[0].in_channels == 32 and layers[-1].out_channels == 256
    if len(layers) > 1:
        assert layers[0].out_channels == 256 // 4
    # every convolution is followed by batch norm and ReLU
    assert sum(isinstance(m, nn.BatchNorm2d) for m in projector) == len(layers)
    assert sum(isinstance(m, nn.ReLU) for m in projector) == len(layers)


def test_unknown_design_is_refused():
    with pytest.raises(ValueError, match="unknown projector design '3x3'"):
        make_projector("3x3", 8, 8)


def test_the_larger_map_is_pooled_to_the_smaller():
    small, large = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8, 8)
    source, target = align(large, small)
    assert torch.equal(source, F.adaptive_avg_pool2d(large, 4)) and target is small
    source, target = align(small, large)
    assert source is small and torch.equal(target, F.adaptive_avg_pool2d(large, 4))


def test_forward_reuses_the_teacher_classifier_on_pooled_projections():
    torch.manual_seed(0)
    simkd = SimKD(student_channels=16, teacher_channels=32).eval()
    classifier = nn.Linear(32, 10)
    feat_s, feat_t = torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4)
    projected, target, logits = simkd(feat_s, feat_t, classifier)
    assert projected.shape == (3, 32, 4, 4) and target is feat_t
    assert torch.allclose(logits, classifier(projected.mean(dim=(2, 3))))
    # evaluation needs only the teacher map's size, never the teacher's features
    assert torch.allclose(simkd.project(feat_s, teacher_size=4), projected)
    assert torch.allclose(classify(projected, classifier), logits)


def test_stage_pairs_of_each_placement():
    assert stage_pairs("single", 3, 3) == [(3, 3)]
    assert stage_pairs("multi", 3, 3) == [(2, 2), (3, 3)]
    # MobileNetV2 (4 stages) from ResNet-32x4 (3 stages), as in the study
    assert stage_pairs("multi", 4, 3) == [(3, 2), (4, 3)]
    assert stage_pairs("all", 4, 3) == [(1, 1), (2, 2), (3, 3), (4, 3)]
    assert stage_pairs("all", 3, 4) == [(1, 2), (2, 3), (3, 4)]
    assert default_weights("multi", 2) == [1 / 3, 2 / 3]
    assert default_weights("all", 4) == [0.25] * 4


# ----------------------------------------------------------------------------- losses


def test_l2_is_the_official_mse_loss_per_sample():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    per_sample = losses.l2(a, b)
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), F.mse_loss(a, b))
    assert losses.l2(torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 3.0]]]])).item() == 2.0


def test_cosine_loss_on_known_vectors():
    x = torch.tensor([[[[1.0]], [[0.0]]]])  # one sample, two channels: (1, 0)
    assert losses.cosine(x, x).item() == pytest.approx(0.0)
    assert losses.cosine(x, -x).item() == pytest.approx(2.0)
    assert losses.cosine(x, x.flip(1)).item() == pytest.approx(1.0)
    # scale does not matter, direction does
    assert losses.cosine(x, 5 * x).item() == pytest.approx(0.0)


def test_kl_is_temperature_squared_times_kl_of_softened_distributions():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[4.0, 0.0]])
    p = torch.softmax(teacher / 4, dim=1)  # teacher at T=4
    expected = 16 * (p * (p / 0.5).log()).sum()
    assert losses.kl_divergence(student, teacher, 4.0).item() == pytest.approx(expected.item())
    assert losses.kl_divergence(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    batch = torch.randn(5, 10), torch.randn(5, 10)
    reference = F.kl_div(
        F.log_softmax(batch[0] / 2, dim=1), F.softmax(batch[1] / 2, dim=1), reduction="batchmean"
    )
    assert losses.kl_divergence(*batch, 2.0).mean().item() == pytest.approx(4 * reference.item())


def test_masked_mean_leaves_out_samples_and_survives_an_empty_mask():
    values = torch.tensor([1.0, 2.0, 6.0])
    assert losses.masked_mean(values, None).item() == 3.0
    assert losses.masked_mean(values, torch.tensor([True, False, True])).item() == 3.5
    assert losses.masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_top1_and_top5_counts():
    # row i ranks class i first, then the classes from 5 down to 0
    logits = torch.eye(6) + torch.arange(6) * 0.01
    labels = torch.tensor([0, 1, 5, 5, 5, 0])
    top1, top5 = losses.correct_top1_top5(logits, labels).tolist()
    assert top1 == 2  # rows 0 and 1
    assert top5 == 5  # all but row 5, where class 0 ranks last of six


# ----------------------------------------------------------------------------- methods


def build(method: str, **keys) -> tuple[distillers.Distiller, distillers.Teacher]:
    torch.manual_seed(0)
    config = resolve(
        Config(teacher="resnet14", student="resnet8", method=method, device="cpu", **keys)
    )
    teacher = distillers.Teacher(models.create("resnet14", 10))
    return distillers.create(config, models.create("resnet8", 10), [teacher]), teacher


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))


def step_of(distiller, images, labels, out) -> distillers.StepOutput:
    return distiller.train_step(distillers.Batch(images, labels, torch.arange(len(labels))), [out])


def test_teacher_correct_only_leaves_misclassified_samples_out_of_distillation():
    distiller, teacher = build("simkd", teacher_correct_only=True)
    images, labels = batch()
    out = teacher(images, labels, set(distiller.teacher_features))
    labels = out.logits.argmax(1).clone()
    labels[:3] = (labels[:3] + 1) % 10  # the teacher is now wrong on three samples
    out = teacher(images, labels, set(distiller.teacher_features))
    step = step_of(distiller, images, labels, out)
    assert step.kept.tolist() == [False] * 3 + [True] * 5
    features, _ = distiller.student(images, is_feat=True)
    projected, target, _ = distiller.projectors[0](features[3], out.features[3])
    assert step.loss.item() == pytest.approx(
        losses.l2(projected, target)[3:].mean().item(), rel=1e-5
    )


def test_kd_is_cross_entropy_plus_scaled_kl():
    distiller, teacher = build("kd")
    images, labels = batch()
    out = teacher(images, labels, set())
    step = step_of(distiller, images, labels, out)
    logits = distiller.student(images)
    expected = F.cross_entropy(logits, labels) + losses.kl_divergence(logits, out.logits, 4).mean()
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert step.kept is None and not distiller.teacher_features


def test_simkd_trains_projectors_not_the_teacher_and_predicts_without_it():
    distiller, teacher = build("simkd", projector="multi")
    assert len(distiller.projectors) == 2 and distiller.teacher_features == {2, 3}
    names = {n.split(".")[0] for n, _ in distiller.named_parameters()}
    assert names == {"student", "projectors"}  # the teacher stays out of the optimizer
    distiller.eval()
    images, labels = batch()
    with torch.no_grad():
        out = teacher(images, labels, set(distiller.teacher_features))
        trained = step_of(distiller, images, labels, out).logits
        predicted = distiller.predict(images)
    assert torch.allclose(trained, predicted, atol=1e-6)


@pytest.mark.parametrize(
    ("loss", "intermediate"), [("l2", losses.l2), ("kl", losses.l2), ("cosine", losses.cosine)]
)
def test_multi_weighs_the_intermediate_projector_by_a_third(loss, intermediate):
    distiller, teacher = build("simkd", projector="multi", loss=loss)
    images, labels = batch()
    out = teacher(images, labels, set(distiller.teacher_features))
    step = step_of(distiller, images, labels, out)
    features, _ = distiller.student(images, is_feat=True)
    first, first_t, _ = distiller.projectors[0](features[2], out.features[2])
    last, last_t, _ = distiller.projectors[1](features[3], out.features[3])
    if loss == "kl":
        final = losses.kl_divergence(classify(last, teacher.classifier), out.logits, 4.0)
    else:
        final = losses.FEATURE_LOSSES[loss](last, last_t)
    expected = (intermediate(first, first_t) / 3 + 2 * final / 3).mean()
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_places_one_projector_per_student_stage():
    torch.manual_seed(0)
    config = resolve(
        Config(teacher="resnet32x4", student="MobileNetV2_1_0", projector="all", device="cpu")
    )
    teacher = distillers.Teacher(models.create("resnet32x4", 100))
    distiller = distillers.create(config, models.create("MobileNetV2_1_0", 100), [teacher])
    assert distiller.pairs == [(1, 1), (2, 2), (3, 3), (4, 3)]
    assert [p.transfer[-3].out_channels for p in distiller.projectors] == [64, 128, 256, 256]
    assert distiller.weights == [0.25] * 4
    assert math.isclose(sum(distiller.weights), 1.0)


# ----------------------------------------------------------------------------- the authors' values


def test_kd_matches_the_official_loss_and_gradient():
    """tests/golden/make_golden.py ran the SimKD repository's `DistillKL(T=4)` in float64."""
    [case] = golden_cases("kd")
    student = golden_tensor(case["inputs"]["logit_s"]).requires_grad_()
    teacher = golden_tensor(case["inputs"]["logit_t"])
    loss = losses.kl_divergence(student, teacher, case["setup"]["T"]).mean()
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-10)
    expected = golden_tensor(case["grads"]["inputs"]["logit_s"])
    torch.testing.assert_close(student.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", golden_cases("simkd"), ids=lambda c: c["case"])
def test_simkd_matches_the_official_projector_loss_and_logits(case):
    """The SimKD repository's `SimKD` module and its loop's MSE, in float64 with batch norm in
    training mode (tests/golden/make_golden.py): the loss, every gradient, the running
    statistics after the step, and the reused classifier's logits."""
    setup = case["setup"]
    projector = SimKD(setup["s_n"], setup["t_n"], factor=setup["factor"]).double().train()
    params = {k: golden_tensor(v) for k, v in case["params"].items()}
    own = {k: v for k, v in params.items() if not k.startswith("cls_t.")}
    projector.load_state_dict(own)
    classifier = nn.Linear(setup["t_n"], setup["num_classes"]).double()
    classifier.load_state_dict(
        {k.removeprefix("cls_t."): params[k] for k in setup["teacher_params"]}
    )
    feat_s = golden_tensor(case["inputs"]["feat_s"]).requires_grad_()
    feat_t = golden_tensor(case["inputs"]["feat_t"])
    projected, target, logits = projector(feat_s, feat_t, classifier)
    loss = losses.l2(projected, target).mean()
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-10)
    grads = case["grads"]
    torch.testing.assert_close(
        feat_s.grad, golden_tensor(grads["inputs"]["feat_s"]), atol=1e-12, rtol=0
    )
    named = dict(projector.named_parameters())
    for name, grad in grads["params"].items():
        torch.testing.assert_close(named[name].grad, golden_tensor(grad), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        logits, golden_tensor(case["outputs"]["pred_feat_s"]), atol=1e-12, rtol=0
    )
    buffers = dict(projector.named_buffers())
    for name, value in case.get("buffers_after", {}).items():
        torch.testing.assert_close(buffers[name], golden_tensor(value), atol=1e-12, rtol=0)
