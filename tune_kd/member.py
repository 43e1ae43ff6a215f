"""One student of a run: its distiller (the student and what it trains alongside), its optimizer
and its running record, built from its configuration alone.

Also the copies of a training step's in-place state (`snapshot`, `restore`) that a CUDA graph's
warm-up needs, written once for a student trained alone (`Member.step_state`) and for a fused
group of students (`tune_kd.fused.FusedGroup.step_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tune_kd import distillers, models
from tune_kd.config import Config
from tune_kd.teachers import teachers_of


@dataclass
class Member:
    """One student of a run: its distiller, optimizer and running record."""

    config: Config
    distiller: distillers.Distiller
    optimizer: torch.optim.Optimizer
    best_test_acc: float = 0.0
    diverged: bool = False
    sums: Tensor | None = field(default=None, repr=False)  # loss, top-1, top-5, dropped: on device

    @property
    def active(self) -> bool:
        return not self.diverged

    def clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step_state(self) -> list[Tensor | None]:
        """Everything a training step changes in place: the distiller's state, the momentum
        buffers (None where SGD has not created one yet) and the sums."""
        buffers = [
            self.optimizer.state.get(p, {}).get("momentum_buffer")
            for p in self.optimizer.param_groups[0]["params"]
        ]
        return [*self.distiller.state_dict().values(), *buffers, self.sums]


def to_device(model: nn.Module, config: Config, device: torch.device) -> nn.Module:
    """`model` on `device`, in channels-last memory format where the configuration asks for it."""
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_member(
    config: Config,
    teachers: Sequence[distillers.Teacher],
    train_labels: Tensor,
    num_classes: int,
    device: torch.device,
) -> Member:
    """A student, its distiller and its optimizer. Seeded by the config alone, so a student
    starts from the same weights whether it trains alone or in a group. `teachers`: those of the
    run, first to last, of which the student distils from as many as its configuration names
    (`tune_kd.teachers.teachers_of`: none, the first, or the first and its extra teachers). A
    configuration its method cannot train (`Distiller.check_run`) is refused first."""
    distillers.get(config.method).check_run(config)
    torch.manual_seed(config.seed)
    student = to_device(models.create(config.student, num_classes=num_classes), config, device)
    own_teachers = teachers[: len(teachers_of(config))]
    distiller = distillers.create(config, student, own_teachers, train_labels).to(device)
    if config.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in distiller.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        fused=device.type == "cuda",  # one kernel for every parameter
    )
    return Member(config, distiller, optimizer)


def snapshot(state: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Copies of a `step_state` (None stays None)."""
    return [None if t is None else t.detach().clone() for t in state]


def restore(state: Sequence[Tensor | None], saved: Sequence[Tensor | None]) -> None:
    """Put a `snapshot` back into the same tensors, in place: a captured graph holds on to the
    tensors themselves. A momentum buffer that did not exist when the snapshot was taken is
    zeroed: SGD's first step gives the same result. One that still does not exist stays so."""
    with torch.no_grad():
        for t, before in zip(state, saved, strict=True):
            if t is None:
                continue
            if before is None:
                t.zero_()
            else:
                t.copy_(before)
