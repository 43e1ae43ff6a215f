"""CRD: the loss and memory against the authors' code, the device-side negatives, the method in a
training step, and its memory banks across a checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import golden_cases, golden_tensor

from tune_kd import distillers, models
from tune_kd.config import Config, resolve
from tune_kd.distillers.crd import CRD, Negatives, step_memory_bytes
from tune_kd.train import Run


def official_state(params: dict) -> dict[str, torch.Tensor]:
    """The official CRDLoss state as this module's: Z is `contrast.params[2:4]` there."""
    state = {name: golden_tensor(t) for name, t in params.items()}
    state["contrast.z"] = state.pop("contrast.params")[2:4]
    return state


def golden_crd(case: dict) -> CRD:
    setup = case["setup"]
    crd = CRD(
        setup["s_dim"],
        setup["t_dim"],
        setup["feat_dim"],
        setup["n_data"],
        setup["nce_t"],
        setup["nce_m"],
    ).double()
    crd.load_state_dict(official_state(case["params"]))
    return crd


def check_step(crd: CRD, case: dict) -> None:
    """One step of `crd` on `case`'s inputs gives the official loss, gradients, memory and Z."""
    inputs = {name: golden_tensor(t) for name, t in case["inputs"].items()}
    feat_s = inputs["feat_s"].requires_grad_()
    crd.zero_grad()
    loss = crd(feat_s, inputs["feat_t"], inputs["idx"], inputs["contrast_idx"])
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-10)
    torch.testing.assert_close(
        feat_s.grad, golden_tensor(case["grads"]["inputs"]["feat_s"]), rtol=0, atol=1e-10
    )
    parameters = dict(crd.named_parameters())
    assert set(parameters) == set(case["grads"]["params"])
    for name, grad in case["grads"]["params"].items():
        torch.testing.assert_close(
            parameters[name].grad, golden_tensor(grad), rtol=0, atol=1e-10, msg=name
        )
    after = official_state(case["buffers_after"])
    for name in ("contrast.memory_v1", "contrast.memory_v2", "contrast.z"):
        torch.testing.assert_close(crd.state_dict()[name], after[name], rtol=1e-12, atol=1e-12)
    z = crd.contrast.z
    assert [z[0].item(), z[1].item()] == pytest.approx(
        [case["z"]["Z_v1"], case["z"]["Z_v2"]], rel=1e-12
    )


def test_two_batches_on_one_memory_match_the_official_crd():
    """Values from tests/golden/make_golden.py (the authors' SimKD code, commits in its
    docstring): the first batch sets Z, the second is scored with that Z fixed, both moving the
    memory banks; the loss, the gradients of the student's features and of both embeddings, the
    banks and Z after each step are the official ones."""
    first, second = golden_cases("crd")
    assert first["setup"]["step"] == 1 and second["setup"]["step"] == 2
    assert first["params"]["contrast.params"]["values"][2] < 0  # Z not set before the first batch
    crd = golden_crd(first)
    check_step(crd, first)
    check_step(crd, second)  # the same memory, carried over from the first step


def test_the_second_batch_from_its_saved_state_matches_too():
    """Loading the state the official module had before the second batch (Z set) continues it."""
    second = golden_cases("crd")[1]
    check_step(golden_crd(second), second)


def contrast_sets(labels: torch.Tensor, nce_k: int, batch: torch.Tensor, draws: int = 20):
    negatives = Negatives(labels, nce_k)
    return [negatives(labels[batch], batch) for _ in range(draws)]


def test_negatives_are_distinct_images_of_other_classes():
    torch.manual_seed(0)
    labels = torch.arange(300) % 3
    batch = torch.tensor([0, 1, 2, 7, 299])
    for contrast_idx in contrast_sets(labels, 150, batch):
        assert contrast_idx.shape == (5, 151)
        assert torch.equal(contrast_idx[:, 0], batch)
        negatives = contrast_idx[:, 1:]
        assert (labels[negatives] != labels[batch].unsqueeze(1)).all()
        assert all(len(set(row.tolist())) == 150 for row in negatives)


def test_negatives_cover_every_other_class_image():
    torch.manual_seed(0)
    labels = torch.arange(30) % 3
    drawn = torch.cat([c[0, 1:] for c in contrast_sets(labels, 5, torch.tensor([4]), 50)])
    assert set(drawn.tolist()) == set(torch.nonzero(labels != labels[4]).flatten().tolist())


def test_negatives_repeat_only_where_a_class_has_too_few_others():
    """As the official sampler: with replacement where the other classes hold fewer than nce_k
    images, without elsewhere; always images of other classes."""
    torch.manual_seed(0)
    labels = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    batch = torch.tensor([0, 95])  # class 0: 10 others; class 1: 90 others
    drawn = set()
    for contrast_idx in contrast_sets(labels, 20, batch):
        scarce, plenty = contrast_idx[0, 1:], contrast_idx[1, 1:]
        assert (labels[scarce] == 1).all()
        assert (labels[plenty] == 0).all() and len(set(plenty.tolist())) == 20
        drawn |= set(scarce.tolist())
    assert drawn == set(range(90, 100))


def test_negatives_with_replacement_for_every_class():
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    batch = torch.arange(6)
    for contrast_idx in contrast_sets(labels, 16, batch):
        negatives = contrast_idx[:, 1:]
        assert (labels[negatives] != labels.unsqueeze(1)).all()
        assert ((negatives >= 0) & (negatives < 6)).all()


def test_a_single_class_has_no_negatives():
    with pytest.raises(ValueError, match="at least two classes"):
        Negatives(torch.zeros(10, dtype=torch.long), 4)


def test_step_memory_is_a_gigabyte_at_the_defaults():
    gathered = step_memory_bytes(64, 16384, 128)
    assert 1.0e9 < gathered < 1.1e9  # the module docstring's figure
    assert step_memory_bytes(64, 16384, 128, n_data=50_000) == gathered + 4 * 64 * 50_000


def crd_config(teacher: str, student: str, **keys) -> Config:
    return resolve(Config(method="crd", teacher=teacher, student=student, device="cpu", **keys))


def test_the_protocol_weights_and_keys():
    config = crd_config("resnet32x4", "resnet8x4")
    assert (config.ce_weight, config.kd_weight, config.feat_weight) == (1.0, 1.0, 0.8)
    assert (config.nce_k, config.nce_t, config.nce_m, config.crd_feat_dim) == (
        16384,
        0.07,
        0.5,
        128,
    )
    assert "teacher_correct_only" in distillers.unused_keys("crd")
    method = distillers.get("crd")
    assert method.needs_indices and not method.fusable and method.capturable
    assert method.structure_keys == ("crd_feat_dim",)


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ("resnet8x4", "resnet32x4"),
        ("vgg8", "vgg13"),
        ("MobileNetV2", "ResNet50"),
        ("wrn_16_2", "wrn_40_2"),
    ],
)
def test_a_training_step_trains_both_embeddings_and_moves_the_memory(student, teacher):
    torch.manual_seed(0)
    config = crd_config(teacher, student, nce_k=32, crd_feat_dim=16)
    train_labels = torch.arange(200) % 100
    t = distillers.Teacher(models.create(teacher, 100))
    distiller = distillers.create(config, models.create(student, 100), [t], train_labels)
    assert distiller.teacher_features == {len(t.feature_shapes) - 1}
    assert distiller.crd.embed_t.linear.in_features == t.feature_shapes[-1][0]
    before = {k: v.clone() for k, v in distiller.state_dict().items() if "contrast" in k}
    assert set(before) == {"crd.contrast.memory_v1", "crd.contrast.memory_v2", "crd.contrast.z"}
    indices = torch.tensor([3, 150])
    batch = distillers.Batch(torch.randn(2, 3, 32, 32), train_labels[indices], indices)
    out = distiller.train_step(batch, [t(batch.images, batch.labels, distiller.teacher_features)])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for embed in (distiller.crd.embed_s, distiller.crd.embed_t):
        assert embed.linear.weight.grad.abs().sum() > 0
    assert (distiller.crd.contrast.z > 0).all()
    for bank in ("memory_v1", "memory_v2"):
        moved = distiller.state_dict()[f"crd.contrast.{bank}"] != before[f"crd.contrast.{bank}"]
        assert torch.equal(torch.nonzero(moved.any(dim=1)).flatten(), indices)


def test_a_resumed_run_continues_the_memory_banks(tiny, tmp_path):
    config = {**tiny, "method": "crd", "nce_k": 32, "crd_feat_dim": 16, "epochs": 2}
    banks = ("crd.contrast.memory_v1", "crd.contrast.memory_v2", "crd.contrast.z")
    uninterrupted = Run([config])
    uninterrupted.train_epoch()
    [expected] = uninterrupted.train_epoch()
    expected_state = uninterrupted.members[0].distiller.state_dict()
    first = Run([config])
    first.train_epoch()
    first.save(tmp_path / "run.pt")
    saved = first.members[0].distiller.state_dict()
    assert (saved["crd.contrast.z"] > 0).all()
    second = Run([config])
    second.load(tmp_path / "run.pt")
    for name in banks:
        assert torch.equal(second.members[0].distiller.state_dict()[name], saved[name])
    # the next epoch goes on from the saved banks exactly as the uninterrupted run does
    [got] = second.train_epoch()
    assert got["train_loss"] == expected["train_loss"]
    for name in banks:
        assert torch.equal(second.members[0].distiller.state_dict()[name], expected_state[name])


def test_the_head_runs_in_float32_under_autocast():
    """Embeddings, scores and loss stay float32 when the networks run in bfloat16."""
    torch.manual_seed(0)
    crd = CRD(16, 24, 8, n_data=40)
    labels = torch.arange(40) % 4
    idx = torch.tensor([1, 6, 11])
    contrast_idx = Negatives(labels, 12)(labels[idx], idx)
    f_s, f_t = torch.randn(3, 16), torch.randn(3, 24)
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    expected = crd(f_s, f_t, idx, contrast_idx)
    crd.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crd(f_s, f_t, idx, contrast_idx)
    assert got.dtype == torch.float32 and crd.contrast.memory_v1.dtype == torch.float32
    assert got.item() == expected.item()
