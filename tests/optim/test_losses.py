"""craftfn.optim.losses equal their torch.nn.functional counterparts (and optax's formulas where torch has none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craftfn.optim import losses

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(6, 5, generator=G, dtype=torch.float64)
INT_LABELS = torch.randint(0, 5, (6,), generator=G)
PROBS = torch.softmax(torch.randn(6, 5, generator=G, dtype=torch.float64), dim=-1)
BIN = torch.randint(0, 2, (6, 5), generator=G).to(torch.float64)
PRED, TARG = torch.randn(6, 4, generator=G, dtype=torch.float64) * 3, torch.randn(6, 4, generator=G, dtype=torch.float64)


CASES = {
    "sigmoid_binary_cross_entropy": (lambda: losses.sigmoid_binary_cross_entropy(LOGITS, BIN), lambda: F.binary_cross_entropy_with_logits(LOGITS, BIN, reduction="none")),
    "softmax_cross_entropy": (lambda: losses.softmax_cross_entropy(LOGITS, PROBS), lambda: F.cross_entropy(LOGITS, PROBS, reduction="none")),
    "softmax_cross_entropy_with_integer_labels": (
        lambda: losses.softmax_cross_entropy_with_integer_labels(LOGITS, INT_LABELS), lambda: F.cross_entropy(LOGITS, INT_LABELS, reduction="none")),
    "integer_labels_class_axis_0": (
        lambda: losses.softmax_cross_entropy_with_integer_labels(LOGITS.T, INT_LABELS, axis=0), lambda: F.cross_entropy(LOGITS, INT_LABELS, reduction="none")),
    "label_smoothing": (
        lambda: losses.softmax_cross_entropy(LOGITS, losses.smooth_labels(F.one_hot(INT_LABELS, 5).double(), 0.1)),
        lambda: F.cross_entropy(LOGITS, INT_LABELS, reduction="none", label_smoothing=0.1)),
    "safe_softmax_cross_entropy": (lambda: losses.safe_softmax_cross_entropy(LOGITS, PROBS), lambda: F.cross_entropy(LOGITS, PROBS, reduction="none")),
    "squared_error": (lambda: losses.squared_error(PRED, TARG), lambda: F.mse_loss(PRED, TARG, reduction="none")),
    "l2_loss": (lambda: losses.l2_loss(PRED, TARG), lambda: 0.5 * F.mse_loss(PRED, TARG, reduction="none")),
    "huber_loss": (lambda: losses.huber_loss(PRED, TARG, delta=1.5), lambda: F.huber_loss(PRED, TARG, reduction="none", delta=1.5)),
    "log_cosh": (lambda: losses.log_cosh(PRED, TARG), lambda: torch.log(torch.cosh(PRED - TARG))),
    "cosine_similarity": (lambda: losses.cosine_similarity(PRED, TARG), lambda: F.cosine_similarity(PRED, TARG, dim=-1)),
    "cosine_distance": (lambda: losses.cosine_distance(PRED, TARG), lambda: 1 - F.cosine_similarity(PRED, TARG, dim=-1)),
    "kl_divergence": (lambda: losses.kl_divergence(torch.log_softmax(LOGITS, -1), PROBS), lambda: F.kl_div(torch.log_softmax(LOGITS, -1), PROBS, reduction="none").sum(-1)),
    "kl_divergence_with_log_targets": (
        lambda: losses.kl_divergence_with_log_targets(torch.log_softmax(LOGITS, -1), PROBS.log()),
        lambda: F.kl_div(torch.log_softmax(LOGITS, -1), PROBS.log(), reduction="none", log_target=True).sum(-1)),
    "hinge_loss": (lambda: losses.hinge_loss(PRED, torch.sign(TARG)), lambda: torch.clamp(1 - PRED * torch.sign(TARG), min=0)),
    "triplet_margin_loss": (
        lambda: losses.triplet_margin_loss(PRED, TARG, TARG.flip(0), eps=0.0),
        lambda: F.triplet_margin_loss(PRED, TARG, TARG.flip(0), reduction="none", eps=0.0)),
    "multiclass_hinge_loss": (
        lambda: losses.multiclass_hinge_loss(LOGITS, INT_LABELS),
        lambda: torch.stack([max(LOGITS[i, j] + (j != INT_LABELS[i]) for j in range(5)) - LOGITS[i, INT_LABELS[i]] for i in range(6)])),
    "poly_loss_eps0_is_cross_entropy": (lambda: losses.poly_loss_cross_entropy(LOGITS, PROBS, epsilon=0.0), lambda: F.cross_entropy(LOGITS, PROBS, reduction="none")),
    "sigmoid_focal_loss_gamma0_is_bce": (
        lambda: losses.sigmoid_focal_loss(LOGITS, BIN, gamma=0.0), lambda: F.binary_cross_entropy_with_logits(LOGITS, BIN, reduction="none")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_equals_torch(name: str) -> None:
    ours, theirs = CASES[name]
    torch.testing.assert_close(ours(), theirs(), rtol=1e-7, atol=1e-9)


def test_ctc_loss_equals_torch_per_sequence() -> None:
    logits = torch.randn(2, 7, 4, generator=G, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 2], [3, 1, 0]])
    label_paddings = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    logit_paddings = torch.tensor([[0.0] * 7, [0.0] * 5 + [1.0] * 2])
    expected = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), labels, torch.tensor([7, 5]), torch.tensor([3, 2]), reduction="none")
    torch.testing.assert_close(losses.ctc_loss(logits, logit_paddings, labels, label_paddings), expected)


def test_losses_are_differentiable_and_keep_batch_shape() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    loss = losses.softmax_cross_entropy_with_integer_labels(logits, INT_LABELS)
    assert loss.shape == (6,)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    torch.testing.assert_close(g, torch.softmax(LOGITS, -1) - F.one_hot(INT_LABELS, 5).double())
