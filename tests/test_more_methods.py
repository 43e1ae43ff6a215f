"""SRRL, SemCKD and DKD against the authors' code, and as methods of a run.

Golden values come from tests/golden/make_golden.py, which ran the official SimKD repository
(SRRL, SemCKD) and mdistiller (DKD) in float64; the commits are named in its docstring.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_cases, golden_tensor
from test_fused import SMALL
from torch import nn

from tune_kd import distillers, fused, models
from tune_kd.config import Config, resolve
from tune_kd.distillers import Batch, Teacher, TeacherOutput
from tune_kd.distillers.base import StageShape
from tune_kd.distillers.dkd import DKD
from tune_kd.distillers.semckd import SemCKD, SemCKDDistiller
from tune_kd.distillers.srrl import Connector, srrl_loss
from tune_kd.train import Run

RELATIVE, ABSOLUTE = 1e-10, 1e-10


def inputs_of(case: dict) -> dict[str, torch.Tensor]:
    """The case's inputs, the student-side ones requiring gradients."""
    tensors = {name: golden_tensor(entry) for name, entry in case["inputs"].items()}
    for name in case["student_inputs"]:
        tensors[name].requires_grad_(True)
    return tensors


def assert_grads(case: dict, inputs: dict, params: dict[str, nn.Parameter]) -> None:
    """Gradients of the student inputs and of every parameter (by official name) as the case's."""
    for name, want in case["grads"]["inputs"].items():
        torch.testing.assert_close(inputs[name].grad, golden_tensor(want), rtol=0, atol=ABSOLUTE)
    assert set(params) == set(case["grads"]["params"])
    for name, want in case["grads"]["params"].items():
        torch.testing.assert_close(params[name].grad, golden_tensor(want), rtol=0, atol=ABSOLUTE)


def assert_buffers(case: dict, buffers: dict[str, torch.Tensor]) -> None:
    """BatchNorm running statistics after the step (training mode) as the official module's."""
    for name, want in case["buffers_after"].items():
        torch.testing.assert_close(buffers[name], golden_tensor(want), rtol=0, atol=ABSOLUTE)


def load(module: nn.Module, case: dict, names: dict[str, str]) -> None:
    """Load the case's official parameters into `module`; `names`: official name -> ours."""
    state = {names[k]: golden_tensor(v) for k, v in case["params"].items() if k in names}
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- SRRL


def test_srrl_matches_the_official_loss_and_gradients():
    [case] = golden_cases("srrl")
    setup = case["setup"]
    connector = Connector(setup["s_n"], setup["t_n"]).double().train()
    classifier = nn.Linear(setup["t_n"], setup["num_classes"]).double()
    load(connector, case, {k: k for k in case["params"] if k.startswith("transfer.")})
    load(classifier, case, {f"cls_t.{n}": n for n in ("weight", "bias")})
    x = inputs_of(case)
    transferred = connector(x["feat_s"])
    loss = srrl_loss(transferred, classifier(transferred), x["feat_t"], x["logit_t"])
    assert loss.item() == pytest.approx(case["loss"], rel=RELATIVE)
    loss.backward()
    params = {k: p for k, p in connector.named_parameters()}
    params.update({f"cls_t.{k}": p for k, p in classifier.named_parameters()})
    assert_grads(case, x, params)
    assert_buffers(case, dict(connector.named_buffers()))
    assert case["protocol"] == {"cls": 1.0, "div": 1.0, "beta": 1.0, "weight": 1.0}
    assert distillers.get("srrl").defaults == {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "feat_weight": 1.0,
    }


def test_srrl_trains_its_connector_not_the_teacher_classifier():
    torch.manual_seed(0)
    teacher = Teacher(models.create("resnet14", 10))
    config = resolve(Config(method="srrl", teacher="resnet14", student="resnet8", device="cpu"))
    distiller = distillers.create(config, models.create("resnet8", 10), [teacher])
    trained = {id(p) for p in distiller.parameters()}
    assert not trained & {id(p) for p in teacher.classifier.parameters()}
    assert "connector.transfer.0.weight" in distiller.state_dict()
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(distiller.predict(images), distiller.student(images))


# ---------------------------------------------------------------- SemCKD

SEMCKD_NAMES = {"query": "queries", "key": "keys"}


def semckd_names(case: dict, teacher_stages: int) -> dict[str, str]:
    """Official SelfA state names -> ours; the embeddings' unused `regressor` layers have none."""
    names = {}
    for official in case["params"]:
        head, rest = official.split(".", 1)
        if head.startswith("regressor"):  # regressor{i}{j}.regressor.N: pair (i, j)
            i, j = int(head[-2]), int(head[-1])
            names[official] = f"projectors.{i * teacher_stages + j}.{rest.split('.', 1)[1]}"
        elif not rest.startswith("regressor."):  # query_i.linear1.weight
            kind, index = head.split("_")
            names[official] = f"{SEMCKD_NAMES[kind]}.{index}.{rest}"
    return names


def test_semckd_matches_the_official_loss_attention_and_gradients():
    [case] = golden_cases("semckd")
    setup = case["setup"]
    stages = [
        [StageShape(shape[1], shape[-1]) for shape in setup[side]]
        for side in ("s_shapes", "t_shapes")
    ]
    module = SemCKD(setup["batch_size"], *stages, temperature=setup["soft"]).double().train()
    names = semckd_names(case, len(stages[1]))
    load(module, case, names)
    unused = set(case["params"]) - set(names)
    assert unused and unused <= set(case["params_without_grad"])
    x = inputs_of(case)
    student = module.student_side([x[f"feat_s_{i}"] for i in range(len(stages[0]))])
    loss, attention = module.loss(student, [x[f"feat_t_{j}"] for j in range(len(stages[1]))])
    assert loss.item() == pytest.approx(case["loss"], rel=RELATIVE)
    torch.testing.assert_close(attention, golden_tensor(case["outputs"]["attention"]))
    loss.backward()
    ours = dict(module.named_parameters())
    params = {official: ours[name] for official, name in names.items() if name in ours}
    assert_grads(case, x, params)
    buffers = dict(module.named_buffers())
    assert_buffers(case, {k: buffers[names[k]] for k in case["buffers_after"]})
    assert case["protocol"]["beta"] == distillers.get("semckd").defaults["feat_weight"] == 400


def test_semckd_skips_a_batch_shorter_than_batch_size(tiny, monkeypatch):
    seen: list[int] = []
    loss = SemCKDDistiller.loss

    def recording(self, out, batch, teachers):
        seen.append(len(batch.labels))
        return loss(self, out, batch, teachers)

    monkeypatch.setattr(SemCKDDistiller, "loss", recording)
    config = {**tiny, "method": "semckd", "synthetic_train_size": 40, "batch_size": 16}
    [metrics] = Run([config]).train_epoch()
    assert seen == [16, 16]  # 40 images: the last batch of 8 is not trained on
    assert metrics["train_loss"] > 0


# ---------------------------------------------------------------- DKD


def dkd_distiller(**values) -> DKD:
    config = resolve(Config(method="dkd", student="resnet8", device="cpu", **values))
    return DKD(models.create("resnet8", 10), config).double()


@pytest.mark.parametrize("case", golden_cases("dkd"), ids=lambda c: c["case"])
def test_dkd_matches_the_official_loss_and_warm_up(case):
    setup = case["setup"]
    assert [setup[k] for k in ("alpha", "beta", "T", "warmup")] == [1.0, 8.0, 4.0, 20]
    dkd = dkd_distiller(ce_weight=0.0)  # the official defaults: alpha 1, beta 8, T 4, warm-up 20
    warmup = dkd.warmup
    dkd.start_epoch(setup["epoch"])
    assert dkd.warmup is warmup and dkd.warmup.item() == setup["warmup_factor"]
    x = inputs_of(case)
    labels = x["target"]
    batch = Batch(torch.empty(len(labels), 0), labels, torch.arange(len(labels)))
    teacher = TeacherOutput(x["logit_t"], {}, torch.ones(len(labels), dtype=torch.bool))
    out = dkd.loss({"logits": x["logit_s"]}, batch, [teacher])
    assert out.loss.item() == pytest.approx(case["loss"], rel=RELATIVE)
    out.loss.backward()
    assert_grads(case, x, {})
    with_ce = dkd_distiller()  # ce_weight 1, as the protocol
    with_ce.start_epoch(setup["epoch"])
    total = with_ce.loss({"logits": x["logit_s"].detach()}, batch, [teacher]).loss
    ce = F.cross_entropy(x["logit_s"].detach(), labels)
    assert total.item() == pytest.approx(case["loss"] + case["protocol"]["ce"] * ce.item())


def test_dkd_reads_neither_kd_nor_feature_weight():
    unused = distillers.unused_keys("dkd")
    assert {"kd_weight", "feat_weight", "teacher_correct_only"} <= set(unused)
    assert "dkd_alpha" not in unused and "dkd_alpha" in distillers.unused_keys("kd")


# ---------------------------------------------------------------- all three as methods

PAIRS = [
    ("resnet8x4", "resnet32x4"),
    ("vgg8", "vgg13"),
    ("wrn_16_2", "wrn_40_2"),
    ("MobileNetV2", "resnet32x4"),  # four student stages against three teacher stages
]


@pytest.mark.parametrize("method", ["srrl", "semckd", "dkd"])
@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_a_method_builds_and_trains_a_step_for_students_of_any_structure(method, student, teacher):
    torch.manual_seed(0)
    config = resolve(
        Config(method=method, teacher=teacher, student=student, batch_size=8, device="cpu")
    )
    teachers = [Teacher(models.create(teacher, 100))]
    distiller = distillers.create(config, models.create(student, 100), teachers).train()
    distiller.start_epoch(30)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    batch = Batch(images, labels, torch.arange(8))
    out = distiller.train_step(batch, [teachers[0](images, labels, distiller.teacher_features)])
    assert out.loss.isfinite() and out.logits.shape == (8, 100)
    out.loss.backward()
    student = {id(p) for p in distiller.student.parameters()}
    extra = [p for p in distiller.parameters() if id(p) not in student]
    assert all(p.grad is not None for p in extra)  # every trained module of the method
    assert all(p.grad is not None for p in distiller.student.get_classifier().parameters())


def test_semckd_students_are_not_fused(tiny):
    run = Run([{**tiny, **SMALL, "method": "semckd", "lr": lr} for lr in (0.01, 0.05)])
    assert fused.fusion_key(run.configs[0]) is None
    assert run.fused_groups(run.members) == []
