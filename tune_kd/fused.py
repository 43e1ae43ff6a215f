"""Students of one structure trained as one horizontally fused model.

After HFTA (Wang et al., MLSys 2021, "Horizontally Fused Training Array"): the students of a group
with equal `fusion_key` (architecture, method, the structure it trains) are stacked, parameter by
parameter, into one model whose operators are G times wider, and trained with one forward, one
backward and one SGD update per batch instead of G of each. `torch.func.vmap` over the
distiller's `forward` does the fusing: the shared batch enters unbatched, so the first
convolution becomes one convolution with G times the filters and the later ones grouped
convolutions; batch norm runs over G x C channels with its running statistics stacked and updated
in place; linear layers become batched matmuls.

Everything else stays per student: each computes its own loss (l2, cosine, kl, its weights and
`teacher_correct_only`) on its slice of the fused outputs, and the update uses its own learning
rate, momentum and weight decay. A student's slices never mix with another's, so one that
diverges spoils only its own; the run drops it from the fused model at the next epoch.

The fused tensors are a working copy: `pull` loads them from the students' own modules and
optimizers at the start of an epoch and `push` writes them back at its end, so evaluation,
checkpoints and exported students are exactly those of students trained one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

from tune_kd import distillers
from tune_kd.config import Config
from tune_kd.distillers import Batch, StepOutput, TeacherOutput
from tune_kd.member import Member


def fusion_key(config: Config) -> tuple | None:
    """Students with equal keys have parameters of the same names and shapes (the method's
    `structure_keys` fix them), the same update rule, and gradients for the same parameters (a
    student without cross-entropy or KL on its logits, as in SimKD, leaves its own classifier
    untouched), so they can be stacked. Learning rate, schedule, momentum, weight decay and every
    other loss key may differ. None for a method whose students cannot be fused."""
    if not distillers.get(config.method).fusable:
        return None
    own_logits = bool(config.ce_weight) or bool(config.kd_weight)
    return (
        config.student,
        config.method,
        *distillers.structure(config),
        own_logits,
        config.nesterov,
    )


def partition(configs: Sequence[Config]) -> list[list[int]]:
    """The positions of `configs` in sub-groups of equal `fusion_key`, in order of first
    appearance; a student that cannot be fused is a sub-group of its own."""
    parts: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        parts.setdefault(fusion_key(config) or ("alone", i), []).append(i)
    return list(parts.values())


class FusedGroup:
    """G students of one `fusion_key` as one model: stacked parameters (G, ...), buffers, momentum
    buffers, and per-student learning rate, momentum and weight decay as (G,) tensors."""

    def __init__(self, members: Sequence[Member]):
        self.members = list(members)
        self.template = members[0].distiller  # runs every student's forward via functional_call
        self.params, self.buffers = stack_module_state([m.distiller for m in members])
        self.momentum = {name: torch.zeros_like(p) for name, p in self.params.items()}
        device = next(iter(self.params.values())).device
        self.lr, self.momentum_rate, self.weight_decay = torch.zeros(3, len(members), device=device)
        self.nesterov = members[0].config.nesterov

    def pull(self) -> None:
        """Load every student's weights, buffers, momentum and current hyperparameters. A momentum
        buffer SGD has not created yet is zero: the first update is then the same."""
        with torch.no_grad():
            for i, m in enumerate(self.members):
                params = dict(m.distiller.named_parameters())
                buffers = dict(m.distiller.named_buffers())
                for name, stacked in self.params.items():
                    stacked[i].copy_(params[name])
                    saved = m.optimizer.state.get(params[name], {}).get("momentum_buffer")
                    if saved is None:
                        self.momentum[name][i].zero_()
                    else:
                        self.momentum[name][i].copy_(saved)
                for name, stacked in self.buffers.items():
                    stacked[i].copy_(buffers[name])
            group = [m.optimizer.param_groups[0] for m in self.members]
            self.lr.copy_(torch.tensor([g["lr"] for g in group]))
            self.momentum_rate.copy_(torch.tensor([g["momentum"] for g in group]))
            self.weight_decay.copy_(torch.tensor([g["weight_decay"] for g in group]))

    def push(self) -> None:
        """Write the fused state back into each student's modules and optimizer state."""
        with torch.no_grad():
            for i, m in enumerate(self.members):
                params = dict(m.distiller.named_parameters())
                buffers = dict(m.distiller.named_buffers())
                for name, stacked in self.params.items():
                    params[name].copy_(stacked[i])
                    if m.config.momentum:
                        buffer = self.momentum[name][i].clone()
                        m.optimizer.state[params[name]]["momentum_buffer"] = buffer
                for name, stacked in self.buffers.items():
                    buffers[name].copy_(stacked[i])

    def step(
        self,
        batch: Batch,
        teachers: Sequence[TeacherOutput],
        autocast: Callable[[], Any],
    ) -> list[StepOutput]:
        """One training step of every student: fused forward, per-student losses, one backward
        of their sum (each student's gradient is its own loss's) and one fused SGD update."""
        with autocast():
            fused = vmap(self._forward, in_dims=(0, 0, None))(
                self.params, self.buffers, batch.images
            )
        outputs = []
        for i, m in enumerate(self.members):
            own = tree_map(lambda t, i=i: t[i], fused)  # this student's slice of every output
            with autocast():
                outputs.append(m.distiller.loss(own, batch, teachers))
        self.clear_grads()
        torch.stack([out.loss for out in outputs]).sum().backward()
        self._sgd()
        return outputs

    def _forward(self, params: dict, buffers: dict, images: Tensor) -> dict[str, Any]:
        return functional_call(self.template, (params, buffers), (images,))

    @torch.no_grad()
    def _sgd(self) -> None:
        """`torch.optim.SGD`'s update (dampening 0) with per-student hyperparameters."""
        for name, p in self.params.items():
            if p.grad is None:  # no student's loss reaches it: SGD leaves it alone
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            rate = self.momentum_rate.view(shape)
            grad = p.grad + self.weight_decay.view(shape) * p
            buffer = self.momentum[name].mul_(rate).add_(grad)
            p.sub_(self.lr.view(shape) * (grad + rate * buffer if self.nesterov else buffer))

    def clear_grads(self) -> None:
        for p in self.params.values():
            p.grad = None

    def step_state(self) -> list[Tensor]:
        """Everything a step changes in place (see `tune_kd.member.snapshot`)."""
        return [
            *self.params.values(),
            *self.buffers.values(),
            *self.momentum.values(),
            *(m.sums for m in self.members),
        ]
