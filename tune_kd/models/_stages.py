"""The stage structure every model of the zoo shares, so that a network can be run, or counted,
one stage at a time.

A model's features are `[stem, stage 1, ..., stage N, pooled]`: entry `i` of that list is
`model.stage(i, entry i - 1)` (entry 0 from the images), and the logits are the classifier on the
pooled vector. `stage_modules(i)` names the submodules that stage `i` runs, so that the parameters
of any run of stages can be counted (`tune_kd.params`). `forward` is defined here once from
`stage`, so a model's stages and its forward cannot disagree.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

__all__ = ["Staged"]


class Staged(nn.Module):
    """A network run as `num_stages + 2` steps: stem, `num_stages` stages, pooling.

    A subclass sets `stage_names`, the names of the submodules of each step (one tuple per step,
    stem first, pooling last), and defines `stage(i, x)` and `get_classifier()`.
    """

    stage_names: ClassVar[tuple[tuple[str, ...], ...]]

    @property
    def num_stages(self) -> int:
        """Stages between the stem and the pooling (3 for the CIFAR ResNets)."""
        return len(self.stage_names) - 2

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Feature `i` of the feature list from feature `i - 1` (from the images for i = 0)."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def stage_modules(self, i: int) -> list[nn.Module]:
        """The submodules that step `i` runs (0: the stem, `num_stages + 1`: the pooling)."""
        return [self.get_submodule(name) for name in self.stage_names[i]]

    def run_stages(self, x: Tensor, first: int, last: int) -> list[Tensor]:
        """The features `first..last` (inclusive), `x` being feature `first - 1` (the images
        for `first` = 0)."""
        features = []
        for i in range(first, last + 1):
            x = self.stage(i, x)
            features.append(x)
        return features

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        """Logits, or `([stem, stage 1, ..., stage N, pooled], logits)` with `is_feat`."""
        features = self.run_stages(x, 0, self.num_stages + 1)
        logits = self.get_classifier()(features[-1])
        return (features, logits) if is_feat else logits
