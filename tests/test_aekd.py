"""AEKD: the teachers' weights are those of the authors' code (a one-class SVM, scikit-learn's,
on the Gram matrix of the KD terms' logit gradients, nu = 1 / (C M)), and the loss is
cross-entropy plus 0.9 times the weighted KD terms.

The reference weights are computed here as the authors' `find_optimal_svm` computes them (without
its optional normalisation, off by default), with scikit-learn's `OneClassSVM`, and the reference
gradients by autograd, one backward pass per teacher as in the authors' loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_multiteacher import batch, build, outputs, teacher_of

from tune_kd.distillers.aekd import logit_gradients, min_norm_weights

svm = pytest.importorskip("sklearn.svm", reason="scikit-learn gives the reference weights")


def svm_weights(gradients: torch.Tensor, c: float) -> torch.Tensor:
    """The authors' weights: the dual coefficients of a one-class SVM of the gradients' Gram
    matrix, nu = 1 / (C M) within [1/M, 1], divided by M nu."""
    count = gradients.shape[0]
    gram = (gradients @ gradients.T).double().numpy()
    nu = min(max(1 / (c * count), 1 / count), 1.0)
    if nu == 1.0:  # every weight at its cap 1/M (scikit-learn finds no intercept then)
        return torch.full((count,), 1 / count, dtype=torch.float64)
    fitted = svm.OneClassSVM(kernel="precomputed", nu=nu, tol=1e-10).fit(gram)
    weights = torch.zeros(count, dtype=torch.float64)
    weights[fitted.support_] = torch.from_numpy(fitted.dual_coef_[0]) / (count * nu)
    return weights


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("c", [0.3, 0.6, 1.0])
def test_the_weights_are_the_one_class_svm_of_the_authors_code(count, c):
    torch.manual_seed(count)
    gradients = torch.randn(count, 10, dtype=torch.float64) * 1e-3 + 2e-3
    cap = min(max(c, 1 / count), 1.0)
    weights = min_norm_weights(gradients, cap)
    assert torch.allclose(weights, svm_weights(gradients, c), atol=1e-5)
    assert weights.sum().item() == pytest.approx(1.0) and weights.max() <= cap + 1e-12


def test_teachers_that_agree_may_share_the_weight_in_any_proportion():
    """Two teachers of one gradient: the weights differ from the SVM's split, the length not."""
    torch.manual_seed(0)
    gradients = torch.randn(2, 10, dtype=torch.float64)
    gradients = torch.stack([gradients[0], gradients[0], gradients[1]])
    weights = min_norm_weights(gradients, 0.6)
    reference = svm_weights(gradients, 0.6)
    assert (weights @ gradients).norm() == pytest.approx((reference @ gradients).norm().item())
    assert weights.min() >= 0 and weights.max() <= 0.6 and weights.sum() == pytest.approx(1.0)


def test_the_gradients_are_those_autograd_gives_the_kd_terms():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    teachers = [torch.randn(8, 10, dtype=torch.float64) for _ in range(3)]
    expected = []
    for t in teachers:  # the authors' DistillKL: summed KL, times T^2, over the batch size
        kl = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(t / 4, 1), reduction="sum")
        (grad,) = torch.autograd.grad(kl * 16 / 8, logits)
        expected.append(grad.mean(dim=0))
    got = logit_gradients(logits.detach(), teachers, 4.0)
    assert torch.allclose(got, torch.stack(expected), rtol=1e-10, atol=1e-14)


def test_the_loss_weighs_the_kd_terms_as_the_authors_loop_does():
    teachers = [teacher_of("resnet14", seed) for seed in (1, 2, 3)]
    distiller = build("aekd", teachers, extra_teachers=["resnet14", "resnet14"])
    data = batch()
    outs = outputs(distiller, teachers, data)
    step = distiller.train_step(data, outs)

    logits = distiller.student(data.images).detach().double().requires_grad_()
    terms, gradients = [], []
    for out in outs:
        p_t = F.softmax(out.logits.double() / 4, 1)
        kl = F.kl_div(F.log_softmax(logits / 4, 1), p_t, reduction="sum") * 16 / len(logits)
        (grad,) = torch.autograd.grad(kl, logits)
        terms.append(kl.detach())
        gradients.append(grad.mean(dim=0))
    weights = svm_weights(torch.stack(gradients), 0.6)
    expected = F.cross_entropy(logits.detach(), data.labels) + 0.9 * (weights @ torch.stack(terms))
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_teacher_takes_the_whole_weight():
    teacher = teacher_of("resnet14", 1)
    aekd, kd = build("aekd", [teacher], kd_weight=1.0), build("kd", [teacher])
    data = batch()
    out = outputs(kd, [teacher], data)
    assert torch.allclose(aekd.train_step(data, out).loss, kd.train_step(data, out).loss)
