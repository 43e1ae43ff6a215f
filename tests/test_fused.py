"""Students trained as one fused model report what they report trained alone.

Tolerance: the fused model computes each student's forward and backward with the same kernels on
the same values (a grouped convolution of G groups is G convolutions), but its SGD update is
written with tensors of per-student hyperparameters, which round differently from torch's
scalar `add_(alpha=...)` by an ulp. Over a few steps that stays far below 1e-4 relative in the
losses; accuracies and every count must be identical.
"""

from __future__ import annotations

import pytest
import torch

from tune_kd import fused, models, train
from tune_kd.train import TIMING_METRICS, Run

RELATIVE = 1e-4
# Two batches of 32 an epoch; fused on the CPU too, where it is off by default.
SMALL = {"synthetic_train_size": 64, "synthetic_test_size": 64, "fuse_students": True}
EXACT = ("epoch", "lr", "train_acc", "test_acc", "test_acc_top5", "best_test_acc")
EXACT += ("dropped_samples", "diverged", "teacher_test_acc")


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_METRICS} for row in rows]


def train_members(run: Run) -> list[list[dict]]:
    rows: list[list[dict]] = [[] for _ in run.members]
    train.fit(run, report=lambda metrics: [r.append(m) for r, m in zip(rows, metrics) if m])
    return rows


def assert_same_metrics(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert set(row) == set(want)
        for key in set(want) - set(TIMING_METRICS):
            if key in EXACT:
                assert row[key] == want[key], key
            else:
                assert row[key] == pytest.approx(want[key], rel=RELATIVE), key


@pytest.fixture
def fused_steps(monkeypatch) -> list[int]:
    """How many students each fused step trained: proves the fused path ran."""
    sizes: list[int] = []
    step = fused.FusedGroup.step

    def counting(self, *args, **kwargs):
        sizes.append(len(self.members))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(fused.FusedGroup, "step", counting)
    return sizes


CELLS = {
    "simkd-single": [  # two epochs: the lr decays between them
        {"loss": "l2", "epochs": 2},
        {"loss": "cosine", "lr": 0.02, "teacher_correct_only": True, "epochs": 2},
        {"loss": "kl", "weight_decay": 1e-3, "momentum": 0.5, "epochs": 2},
    ],
    "simkd-multi": [
        {"projector": "multi", "loss": "l2", "teacher_correct_only": True},
        {"projector": "multi", "loss": "kl", "lr": 0.02},
        {"projector": "multi", "loss": "cosine", "intermediate_loss": "l2", "nesterov": True},
        {"projector": "multi", "loss": "l2", "lr": 0.1, "nesterov": True},
    ],
    "simkd-all": [
        {"projector": "all", "loss": "cosine"},
        {"projector": "all", "loss": "kl", "projector_weights": [0.2, 0.3, 0.5]},
        {"projector": "all", "loss": "l2", "teacher_correct_only": True, "lr": 0.01},
    ],
    "simkd-ce-dw": [  # a depthwise projector, and students with and without cross-entropy
        {"projector_design": "1x1-dw3x3-1x1", "loss": "l2", "ce_weight": 1.0},
        {"projector_design": "1x1-dw3x3-1x1", "loss": "kl", "ce_weight": 0.5},
        {"projector_design": "1x1-dw3x3-1x1", "loss": "cosine"},
    ],
    "kd": [
        {"method": "kd"},
        {"method": "kd", "lr": 0.02, "teacher_correct_only": True, "temperature": 2.0},
    ],
    "student": [{"method": "student"}, {"method": "student", "lr": 0.1, "weight_decay": 0.0}],
}


@pytest.mark.parametrize("cells", CELLS.values(), ids=CELLS.keys())
def test_a_fused_student_reports_what_it_reports_alone(tiny, fused_steps, cells):
    configs = [{**tiny, **SMALL, "epochs": 1, **cell} for cell in cells]
    grouped = train_members(Run(configs))
    assert fused_steps and max(fused_steps) >= 2  # at least two students trained as one
    for config, rows in zip(configs, grouped):
        assert_same_metrics(rows, train_members(Run([config]))[0])


def test_students_of_other_structures_fuse_apart(tiny, fused_steps):
    cells = [
        {"loss": "l2"},
        {"loss": "kl", "projector": "multi"},
        {"loss": "cosine", "lr": 0.02},
        {"loss": "l2", "projector": "multi", "lr": 0.02},
        {"loss": "l2", "student": "resnet14"},  # alone in its sub-group: trained on its own
    ]
    configs = [{**tiny, **SMALL, "epochs": 1, **cell} for cell in cells]
    run = Run(configs)
    keys = [[fused.fusion_key(m.config) for m in g.members] for g in run.fused_groups(run.members)]
    assert [len(k) for k in keys] == [2, 2] and all(len(set(k)) == 1 for k in keys)
    grouped = train_members(run)
    assert set(fused_steps) == {2}
    for config, rows in zip(configs, grouped):
        assert_same_metrics(rows, train_members(Run([config]))[0])


def test_fuse_students_false_trains_one_after_another(tiny, fused_steps):
    configs = [
        {**tiny, **SMALL, "epochs": 1, "lr": lr, "fuse_students": False} for lr in (0.01, 0.05)
    ]
    train_members(Run(configs))
    assert fused_steps == []


def test_a_diverging_student_stops_alone_and_leaves_the_others_unchanged(tiny, fused_steps):
    cells = [
        {"loss": "l2", "lr": 0.05},
        {"loss": "cosine", "lr": 1e6},  # diverges in the first epoch
        {"loss": "kl", "lr": 0.02},
    ]
    configs = [{**tiny, **SMALL, "epochs": 3, **cell} for cell in cells]
    grouped = train_members(Run(configs))
    assert [r["diverged"] for r in grouped[1]] == [True]
    assert fused_steps == [3, 3] + [2] * 4  # two steps an epoch: three students, then two
    for i in (0, 2):
        assert len(grouped[i]) == 3
        assert_same_metrics(grouped[i], train_members(Run([configs[i]]))[0])


def test_a_fused_group_resumes_exactly_and_checkpoints_are_interchangeable(tiny, tmp_path):
    cells = [{"loss": "l2", "lr": 0.05}, {"loss": "kl", "lr": 0.02, "momentum": 0.8}]
    configs = [{**tiny, **SMALL, "epochs": 3, **cell} for cell in cells]
    uninterrupted = train_members(Run(configs))
    first = Run(configs)
    head = first.train_epoch()
    first.save(tmp_path / "group.pt")
    for fuse in (True, False):  # continued fused, or one after another from the same file
        second = Run([{**c, "fuse_students": fuse} for c in configs])
        second.load(tmp_path / "group.pt")
        tail = train_members(second)
        for i in range(len(configs)):
            resumed = [head[i], *tail[i]]
            if fuse:  # exactly
                assert without_timing(resumed) == without_timing(uninterrupted[i])
            else:
                assert_same_metrics(resumed, uninterrupted[i])


def test_an_exported_fused_student_is_an_ordinary_model(tiny, tmp_path):
    configs = [{**tiny, **SMALL, "epochs": 1, "lr": lr} for lr in (0.01, 0.05)]
    run = Run(configs)
    train_members(run)
    run.export_student(1, tmp_path / "student.pth")
    model = models.load_checkpoint(tmp_path / "student.pth", name="resnet8")
    trained = run.members[1].distiller.student.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert not torch.equal(trained["conv1.weight"], run.members[0].distiller.student.conv1.weight)
