"""FitNet, AT, SP and VID: each method's term against the authors' code, on every shape branch of
the golden fixture, and each method built and trained around students and teachers of different
structure.

Golden values come from tests/golden/make_golden.py, which ran the official SimKD code (commits in
its docstring) in float64; our modules are loaded with the same parameters and fed the same
inputs, in float64, BatchNorm in training mode as in the official loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_cases, golden_tensor
from test_fused import SMALL, assert_same_metrics, fused_steps, train_members  # noqa: F401
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tune_kd import distillers, losses, models
from tune_kd.config import Config, resolve
from tune_kd.distillers.at import at_loss, attention_map
from tune_kd.distillers.fitnet import ConvReg, fitnet_loss
from tune_kd.distillers.sp import similarity, sp_loss
from tune_kd.distillers.vid import VIDRegressor, vid_loss

REL = 1e-10
ATOL = 1e-10


def inputs_of(case: dict) -> dict[str, torch.Tensor]:
    """The case's inputs, the student-side ones requiring gradients."""
    tensors = {name: golden_tensor(entry) for name, entry in case["inputs"].items()}
    for name in case["student_inputs"]:
        tensors[name].requires_grad_(True)
    return tensors


def numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """`prefix_0`, `prefix_1`, ... in order."""
    count = sum(name.startswith(prefix + "_") for name in tensors)
    return [tensors[f"{prefix}_{i}"] for i in range(count)]


def load_params(module: nn.Module, params: dict) -> None:
    """The official state dict into `module` (same names, same shapes: strict)."""
    module.load_state_dict({name: golden_tensor(entry) for name, entry in params.items()})


def assert_golden(case: dict, loss: torch.Tensor, tensors: dict, module: nn.Module | None) -> None:
    """The loss, and its gradients wrt the student inputs and every parameter, equal the case's."""
    assert loss.item() == pytest.approx(case["loss"], rel=REL)
    loss.backward()
    for name, entry in case["grads"]["inputs"].items():
        torch.testing.assert_close(tensors[name].grad, golden_tensor(entry), rtol=0, atol=ATOL)
    params = dict(module.named_parameters()) if module is not None else {}
    assert set(params) == set(case["grads"]["params"])
    for name, entry in case["grads"]["params"].items():
        torch.testing.assert_close(params[name].grad, golden_tensor(entry), rtol=0, atol=ATOL)


def case_ids(method: str) -> list[str]:
    return [c["case"] for c in golden_cases(method)]


# ----------------------------------------------------------------------------- golden values


@pytest.mark.parametrize("case", golden_cases("fitnet"), ids=case_ids("fitnet"))
def test_fitnet_matches_the_official_hint_loss_on_every_regressor_branch(case):
    setup = case["setup"]
    regressor = ConvReg(setup["s_shape"][1:], setup["t_shape"][1:]).double().train()
    load_params(regressor, case["params"])
    tensors = inputs_of(case)
    loss = fitnet_loss(regressor(tensors["feat_s"]), regressor.target(tensors["feat_t"]))
    assert_golden(case, loss, tensors, regressor)
    buffers = dict(regressor.named_buffers())
    for name, entry in case["buffers_after"].items():
        torch.testing.assert_close(buffers[name], golden_tensor(entry), rtol=0, atol=ATOL)


def test_fitnet_regressor_branches_follow_the_heights():
    def conv(s: tuple, t: tuple) -> nn.Module:
        return ConvReg(s, t).conv

    assert conv((3, 8, 8), (4, 4, 4)).stride == (2, 2)  # double: halved
    assert isinstance(conv((3, 4, 4), (4, 8, 8)), nn.ConvTranspose2d)  # half: doubled
    assert conv((3, 6, 5), (4, 4, 4)).kernel_size == (3, 2)  # larger: shrunk by its kernel
    smaller = ConvReg((3, 4, 4), (4, 6, 6))
    assert smaller.conv.padding == (1, 1) and smaller.teacher_size == 4
    teacher = torch.randn(2, 4, 6, 6)
    assert torch.equal(smaller.target(teacher), F.adaptive_avg_pool2d(teacher, 4))
    assert ConvReg((3, 4, 4), (4, 4, 4)).target(teacher) is teacher


@pytest.mark.parametrize("case", golden_cases("at"), ids=case_ids("at"))
def test_at_matches_the_official_attention_loss(case):
    tensors = inputs_of(case)
    loss = at_loss(numbered(tensors, "feat_s"), numbered(tensors, "feat_t"))
    assert_golden(case, loss, tensors, None)


def test_attention_map_is_the_normalised_channel_mean_of_squares():
    feature = torch.tensor([[[[3.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 2.0]], [[0.0, 2.0]]]])
    assert torch.allclose(attention_map(feature), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("case", golden_cases("sp"), ids=case_ids("sp"))
def test_sp_matches_the_official_similarity_loss(case):
    tensors = inputs_of(case)
    assert_golden(case, sp_loss(tensors["feat_s"], tensors["feat_t"]), tensors, None)


def test_similarity_rows_are_unit_vectors_of_inner_products():
    feature = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    expected = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 2.0]]), dim=1)
    assert torch.allclose(similarity(feature), expected)
    assert sp_loss(feature, 3 * feature).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("case", golden_cases("vid"), ids=case_ids("vid"))
def test_vid_matches_the_official_variational_loss(case):
    setup, tensors = case["setup"], inputs_of(case)
    if "s_channels" in setup:  # several stages, one regressor each, summed
        channels = zip(setup["s_channels"], setup["t_channels"])
        module = nn.ModuleList(VIDRegressor(s, t, t) for s, t in channels)
    else:
        assert setup["num_mid_channel"] == setup["num_target_channels"]
        module = nn.ModuleList(
            [VIDRegressor(setup["num_input_channels"], *[setup["num_target_channels"]] * 2)]
        )
        tensors["feat_s_0"], tensors["feat_t_0"] = tensors["feat_s"], tensors["feat_t"]
        case = {**case, "params": {f"0.{k}": v for k, v in case["params"].items()}}
        grads = {f"0.{k}": v for k, v in case["grads"]["params"].items()}
        case["grads"] = {**case["grads"], "params": grads}
    assert setup["init_pred_var"] == 5.0 and setup["eps"] == 1e-5
    module = module.double()
    for i, regressor in enumerate(module):  # our initial log_scale is the official one (float32)
        official = golden_tensor(case["params"][f"{i}.log_scale"])
        assert torch.equal(regressor.log_scale.float(), official.float())
    load_params(module, case["params"])
    feat_t = numbered(tensors, "feat_t")
    predicted = [r(f, t.shape[-1]) for r, f, t in zip(module, numbered(tensors, "feat_s"), feat_t)]
    loss = vid_loss([m for m, _ in predicted], [v for _, v in predicted], feat_t)
    assert_golden(case, loss, tensors, module)


def test_vid_variance_starts_at_five():
    _, variance = VIDRegressor(3, 4, 4)(torch.randn(2, 3, 2, 2), 2)
    assert torch.allclose(variance, torch.full((4,), 5.0))


# ----------------------------------------------------------------------------- the methods

WEIGHTS = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "vid": 1.0}
# (student, teacher): same family; VGG (four stages) from ResNet (three); MobileNetV2 from
# ResNet50 (four stages each, of other sizes); FitNet's transposed and strided regressors: stage 1
# of ShuffleV1 half resnet32x4's size, of resnet8x4 twice ShuffleV2's.
PAIRS = [
    ("resnet8x4", "resnet32x4"),
    ("vgg8", "vgg13"),
    ("vgg8", "resnet32x4"),
    ("MobileNetV2", "ResNet50"),
    ("wrn_16_2", "wrn_40_2"),
    ("ShuffleV1", "resnet32x4"),
    ("resnet8x4", "ShuffleV2"),
]


def build(method: str, student: str, teacher: str, **keys):
    torch.manual_seed(0)
    config = resolve(Config(teacher=teacher, student=student, method=method, device="cpu", **keys))
    teacher_model = distillers.Teacher(models.create(teacher, 100))
    distiller = distillers.create(config, models.create(student, 100), [teacher_model])
    return distiller, teacher_model


def step(distiller, teacher):
    torch.manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    out = teacher(images, labels, set(distiller.teacher_features))
    batch = distillers.Batch(images, labels, torch.arange(4))
    return distiller.train_step(batch, [out]), out, labels


def logit_terms(logits: torch.Tensor, labels: torch.Tensor, out) -> torch.Tensor:
    """The official loop's cross-entropy + KL (weights 1, T = 4) beside each method's term."""
    return losses.cross_entropy(logits, labels) + losses.kl_divergence(logits, out.logits, 4).mean()


def student_features(distiller) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    return distiller.student(images, is_feat=True)


@pytest.mark.parametrize("method", WEIGHTS)
def test_paper_protocol_weights(method):
    config = resolve(Config(teacher="resnet32x4", student="resnet8x4", method=method))
    assert (config.ce_weight, config.kd_weight) == (1.0, 1.0)
    assert config.feat_weight == WEIGHTS[method]
    assert distillers.get(method).fusable and distillers.get(method).capturable


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_fitnet_trains_its_regressor_on_the_hint_layer(student, teacher):
    distiller, teacher_model = build("fitnet", student, teacher)
    assert distiller.teacher_features == {1}
    result, out, labels = step(distiller, teacher_model)
    features, logits = student_features(distiller)
    regressor = distiller.regressor
    hint = fitnet_loss(regressor(features[1]), regressor.target(out.features[1]))
    expected = 100 * hint + logit_terms(logits, labels, out)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    result.loss.backward()
    assert all(p.grad is not None for p in distiller.regressor.parameters())


def test_a_hint_layer_beyond_the_feature_maps_is_refused():
    with pytest.raises(ValueError, match="hint_layer 4 is not a feature map of both"):
        build("fitnet", "resnet8x4", "vgg13", hint_layer=4)


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_at_pairs_stages_up_to_the_shorter_list(student, teacher):
    distiller, teacher_model = build("at", student, teacher)
    stages = min(len(distillers.stage_shapes(distiller.student)), len(teacher_model.stages))
    assert distiller.teacher_features == set(range(1, stages + 1))
    result, out, labels = step(distiller, teacher_model)
    features, logits = student_features(distiller)
    term = at_loss(features[1 : stages + 1], [out.features[i] for i in range(1, stages + 1)])
    expected = 1000 * term + logit_terms(logits, labels, out)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    result.loss.backward()


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_sp_compares_the_last_maps(student, teacher):
    distiller, teacher_model = build("sp", student, teacher)
    last = len(teacher_model.feature_shapes) - 2
    assert distiller.teacher_features == {last}
    result, out, labels = step(distiller, teacher_model)
    features, logits = student_features(distiller)
    expected = 3000 * sp_loss(features[-2], out.features[last]) + logit_terms(logits, labels, out)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    result.loss.backward()


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_vid_has_one_regressor_per_stage_pair(student, teacher):
    distiller, teacher_model = build("vid", student, teacher)
    pairs = min(len(distillers.stage_shapes(distiller.student)), len(teacher_model.stages))
    assert len(distiller.regressors) == pairs
    assert distiller.teacher_features == set(range(1, pairs + 1))
    result, out, labels = step(distiller, teacher_model)
    features, logits = student_features(distiller)
    teacher_maps = [out.features[i + 1] for i in range(pairs)]
    predicted = [
        r(features[i + 1], t.shape[-1])
        for i, (r, t) in enumerate(zip(distiller.regressors, teacher_maps))
    ]
    term = vid_loss([m for m, _ in predicted], [v for _, v in predicted], teacher_maps)
    expected = term + logit_terms(logits, labels, out)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    result.loss.backward()
    assert all(p.grad is not None for p in distiller.regressors.parameters())


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [
        ((3, 8, 8), (4, 4, 4)),
        ((3, 4, 4), (4, 8, 8)),
        ((3, 6, 6), (4, 4, 4)),
        ((3, 4, 4), (4, 6, 6)),
    ],
)
def test_fitnet_regressors_run_stacked_under_vmap(s_shape, t_shape):
    torch.manual_seed(0)
    regressors = [ConvReg(s_shape, t_shape) for _ in range(2)]
    params, buffers = stack_module_state(regressors)
    feat_s = torch.randn(5, *s_shape)

    def run(p, b, x):
        return functional_call(regressors[0], (p, b), (x,))

    fused = vmap(run, in_dims=(0, 0, None))(params, buffers, feat_s)
    for i, regressor in enumerate(regressors):
        torch.testing.assert_close(fused[i], regressor(feat_s), rtol=1e-5, atol=1e-6)
