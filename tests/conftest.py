"""Shared fixtures: a small teacher checkpoint in the field's layout, and tiny configurations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune_kd import models


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint as RepDistiller writes them: `{'model': state_dict, 'epoch', 'best_acc'}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": 0.0}, path)
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet14 with 10 classes, saved as `resnet14_vanilla/ckpt_epoch_240.pth`."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("teachers")
    return save_checkpoint(
        models.create("resnet14", 10), folder / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    )


@pytest.fixture
def tiny(teacher_checkpoint) -> dict:
    """A SimKD run on a few synthetic images: seconds on a CPU."""
    return {
        "dataset": "synthetic",
        "synthetic_train_size": 96,
        "synthetic_test_size": 64,
        "teacher": "resnet14",
        "teacher_checkpoint": str(teacher_checkpoint),
        "student": "resnet8",
        "method": "simkd",
        "batch_size": 32,
        "epochs": 2,
        "lr_decay_epochs": [1],
        "device": "cpu",
    }
