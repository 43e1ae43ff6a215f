"""CRD (Tian, Krishnan and Isola, ICLR 2020, "Contrastive Representation Distillation"): a
contrastive (NCE) loss between the student's and the teacher's pooled features, with negatives
from a memory bank of every training image, as the SimKD repository's `crd/` trains it.

Both pooled features (`feat[-1]`) are embedded by a linear layer into `crd_feat_dim` dimensions and
L2-normalised; both embeddings are trained with the student. Two memory banks of one row per
training image hold past embeddings: `memory_v1` the student's, `memory_v2` the teacher's. For each
sample, row 0 of its contrast set is its own index and the other `nce_k` are images of other
classes. Each side scores its embedding against the other side's bank,
`out = exp(memory[contrast_idx] . v / nce_t)`, divides by a constant Z (fixed on the first batch to
`mean(out) * n_data`, per side) and pays the NCE loss of Eq. 18 with noise probability `1/n_data`;
the term is the two sides' sum. After scoring, each bank's rows of the batch move towards the
side's new embedding with momentum `nce_m` and are normalised again.

Memory: each side gathers `batch x (nce_k + 1) x crd_feat_dim` fp32 rows of its bank, kept for the
backward pass: 64 x 16385 x 128 x 4 bytes = 537 MB per side, 1.07 GB a step at the defaults
(`step_memory_bytes`), besides the `n_data` x `crd_feat_dim` banks themselves (2 x 25.6 MB for
CIFAR's 50 000 images).

Where this differs from the official code, deliberately:
- Negatives are drawn on the device in the training step (random keys over the training set, the
  sample's own class excluded, the top `nce_k` kept), not by the data loader with numpy: the
  distribution is the same (uniform over other-class images, without replacement unless a class
  has fewer other-class images than `nce_k`, then with), and the step stays free of host syncs.
  The keys cost `batch x n_data` floats a step (12.8 MB at batch 64 on CIFAR).
- Z is a tensor buffer set through `torch.where` on "not yet set" (negative) rather than a Python
  branch on its value; the embedding, scores and loss run in float32 even under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tune_kd.distillers.base import (
    WITH_LOGIT_TERMS,
    Batch,
    Distiller,
    StepOutput,
    Teacher,
    TeacherOutput,
    feature_shapes,
    key,
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config

EPS = 1e-7  # the official loss's guard in its denominators


def step_memory_bytes(batch_size: int, nce_k: int, feat_dim: int, n_data: int = 0) -> int:
    """Bytes of the temporaries one CRD step holds beyond its networks': the fp32 memory rows
    gathered for both sides (`2 x batch x (nce_k + 1) x feat_dim`, kept for backward), and, given
    the training set's size `n_data`, the negative sampler's `batch x n_data` float keys (the
    `batch x nce_k` index tensors, a hundredth of the rows, aside)."""
    gathered = 2 * batch_size * (nce_k + 1) * feat_dim
    return 4 * (gathered + batch_size * n_data)


def fp32(t: Tensor) -> torch.autocast:
    """A region where autocast is off, so that what `t`'s device computes there stays float32."""
    return torch.autocast(t.device.type, enabled=False)


def normalize(x: Tensor) -> Tensor:
    """Each row divided by its L2 norm (no guard against zero, as the official `Normalize`)."""
    return x / x.norm(dim=1, keepdim=True)


class Embed(nn.Module):
    """Flatten, a linear layer, L2 normalisation. The name `linear` matches the official code."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        with fp32(x):
            return normalize(self.linear(x.flatten(1).to(self.linear.weight.dtype)))


def contrast_loss(probs: Tensor, n_data: int) -> Tensor:
    """Eq. 18's NCE loss of one side, from `probs = out / Z` ([batch, K + 1], column 0 the
    positive): `-(sum log(P0 / (P0 + K/N + eps)) + sum log((K/N) / (Pk + K/N + eps))) / batch`."""
    noise = (probs.shape[1] - 1) * (1 / n_data)  # K * Pn, as the official code rounds it
    positive, negatives = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(positive / (positive + (noise + EPS)))
    log_d0 = torch.log(noise / (negatives + (noise + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


class ContrastMemory(nn.Module):
    """The two memory banks and the normalisation constants Z (buffers, in the state dict).

    `forward(v_s, v_t, idx, contrast_idx)` returns `(P_s, P_t)`, each side's scores divided by its
    Z, then moves the banks' rows `idx` towards the new embeddings.
    """

    def __init__(self, feat_dim: int, n_data: int, nce_t: float, nce_m: float):
        super().__init__()
        self.n_data = n_data
        self.temperature = nce_t
        self.momentum = nce_m
        bound = 1 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim) * (2 * bound) - bound)
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim) * (2 * bound) - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # student side, teacher side; <0: unset

    def forward(
        self, v_s: Tensor, v_t: Tensor, idx: Tensor, contrast_idx: Tensor
    ) -> tuple[Tensor, Tensor]:
        with fp32(v_s):
            v_s, v_t = v_s.to(self.memory_v1.dtype), v_t.to(self.memory_v1.dtype)
            out_s = self.score(self.memory_v2, contrast_idx, v_s)
            out_t = self.score(self.memory_v1, contrast_idx, v_t)
            first = torch.stack([out_s.mean(), out_t.mean()]).detach() * self.n_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
            z = self.z.clone()  # what the scores were divided by, whatever later steps set
            with torch.no_grad():
                self.update(self.memory_v1, idx, v_s)
                self.update(self.memory_v2, idx, v_t)
        return out_s / z[0], out_t / z[1]

    def score(self, memory: Tensor, contrast_idx: Tensor, v: Tensor) -> Tensor:
        """`exp(memory[contrast_idx] . v / T)`, [batch, K + 1]."""
        rows = memory[contrast_idx]  # [batch, K + 1, dim]
        return torch.exp(torch.bmm(rows, v.unsqueeze(2)).squeeze(2) / self.temperature)

    def update(self, memory: Tensor, idx: Tensor, v: Tensor) -> None:
        moved = memory[idx] * self.momentum + v * (1 - self.momentum)
        memory.index_copy_(0, idx, normalize(moved))


class CRD(nn.Module):
    """The embeddings and memory of CRD, under the official names (`embed_s`, `embed_t`,
    `contrast.memory_v1`, `contrast.memory_v2`), so the official state loads (Z aside: the
    official keeps it in `contrast.params[2:4]`, here `contrast.z`)."""

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        feat_dim: int,
        n_data: int,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_t, nce_m)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        """The CRD term of pooled features `f_s`, `f_t` of the images `idx` of the training set."""
        return self.term(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)

    def term(self, v_s: Tensor, v_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        """The two sides' NCE losses summed, from the embeddings; updates the memory."""
        p_s, p_t = self.contrast(v_s, v_t, idx, contrast_idx)
        n_data = self.contrast.n_data
        return contrast_loss(p_s, n_data) + contrast_loss(p_t, n_data)


class Negatives(nn.Module):
    """Draws each sample's contrast set on the device: its own index, then `nce_k` images of other
    classes, uniformly, without replacement where its class leaves at least `nce_k` others (the
    official sampler's rule) and with replacement otherwise.

    Without replacement: uniform keys over the training set, the sample's class set to -1, the
    top `nce_k` (a `batch x n_data` temporary). With replacement: a uniform rank among the
    `n_data - count[class]` other-class images, mapped to an image through the training set sorted
    by class. Which of the two runs is decided here from the labels, so a step has no branch on
    tensor values.
    """

    def __init__(self, train_labels: Tensor, nce_k: int):
        super().__init__()
        self.k = nce_k
        labels = train_labels.long()
        counts = torch.bincount(labels)
        present = counts > 0
        pools = len(labels) - counts  # images of other classes, per class
        if bool((pools[present] == 0).any()):
            raise ValueError("CRD needs training images of at least two classes")
        replace = (pools < nce_k) & present
        self.with_replacement = bool(replace.any())
        self.without_replacement = bool((~replace & present).any())
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("replace", replace, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("count", counts, persistent=False)

    def forward(self, labels: Tensor, indices: Tensor) -> Tensor:
        """[batch, nce_k + 1] training-set indices: column 0 `indices`, then the negatives."""
        labels = labels.long()
        if not self.with_replacement:
            negatives = self.distinct(labels)
        elif not self.without_replacement:
            negatives = self.repeated(labels)
        else:
            replace = self.replace[labels].unsqueeze(1)
            negatives = torch.where(replace, self.repeated(labels), self.distinct(labels))
        return torch.cat([indices.long().unsqueeze(1), negatives], dim=1)

    def distinct(self, labels: Tensor) -> Tensor:
        keys = torch.rand(len(labels), len(self.labels), device=labels.device)
        keys.masked_fill_(self.labels.unsqueeze(0) == labels.unsqueeze(1), -1.0)
        return keys.topk(self.k, dim=1).indices

    def repeated(self, labels: Tensor) -> Tensor:
        start, count = self.start[labels].unsqueeze(1), self.count[labels].unsqueeze(1)
        pool = len(self.labels) - count
        draws = torch.rand(len(labels), self.k, device=labels.device)
        rank = torch.minimum((draws * pool).long(), pool - 1)
        return self.order[rank + (rank >= start) * count]


@register
class CRDDistiller(Distiller):
    """CRD's term on the last pooled features, with CE and KD as in the official loop."""

    name = "crd"
    keys = (
        key("nce_k", 16384, "CRD: negatives per sample", low=1),
        key("nce_t", 0.07, "CRD: temperature of the contrastive scores", low=0, open_low=True),
        key("nce_m", 0.5, "CRD: momentum of the memory banks' update", low=0, high=1),
        key("crd_feat_dim", 128, "CRD: dimension of the embeddings", low=1),
    )
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 1.0, "feat_weight": 0.8}
    structure_keys = ("crd_feat_dim",)
    needs_indices = True
    fusable = False  # per-student memory banks, updated by index

    @classmethod
    def extra_memory_bytes(cls, config: Config, train_images: int) -> int:
        """The two memory banks and a step's gathered rows and sampler keys."""
        banks = 2 * train_images * config.crd_feat_dim * 4
        return banks + step_memory_bytes(
            config.batch_size, config.nce_k, config.crd_feat_dim, train_images
        )

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        if train_labels is None:
            raise ValueError("method 'crd' needs the training set's labels")
        self.teacher_index = len(teacher.feature_shapes) - 1
        self.teacher_features = frozenset({self.teacher_index})
        self.crd = CRD(
            math.prod(feature_shapes(student)[-1]),
            math.prod(teacher.feature_shapes[-1]),
            config.crd_feat_dim,
            len(train_labels),
            config.nce_t,
            config.nce_m,
        )
        self.negatives = Negatives(train_labels, config.nce_k)

    def forward(self, images: Tensor) -> dict[str, Any]:
        features, logits = self.student(images, is_feat=True)
        return {"embedding": self.crd.embed_s(features[-1]), "logits": logits}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        contrast_idx = self.negatives(batch.labels, batch.indices)
        v_t = self.crd.embed_t(teacher.features[self.teacher_index])
        term = self.crd.term(out["embedding"], v_t, batch.indices, contrast_idx)
        logits = out["logits"]
        return StepOutput(self.with_logit_terms(term, logits, batch, teacher), logits, None)
