"""optax's loss functions (``optax.losses``) on torch tensors.

Each returns the per-example loss (no reduction), with optax's argument names; where
``torch.nn.functional`` has the same loss, it computes it (one implementation) and the
tests check the two agree. Labels are probabilities (``softmax_cross_entropy``) or class
indices (``..._with_integer_labels``), as in optax; the class axis is the last one.

Example:
    >>> import torch
    >>> from craftfn.optim import losses
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> losses.softmax_cross_entropy_with_integer_labels(logits, torch.tensor([0]))
    tensor([0.1698])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "safe_softmax_cross_entropy",
    "smooth_labels",
    "poly_loss_cross_entropy",
    "sigmoid_focal_loss",
    "l2_loss",
    "squared_error",
    "huber_loss",
    "log_cosh",
    "cosine_similarity",
    "cosine_distance",
    "hinge_loss",
    "multiclass_hinge_loss",
    "perceptron_loss",
    "multiclass_perceptron_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "convex_kl_divergence",
    "generalized_kl_divergence",
    "ctc_loss",
    "triplet_margin_loss",
]


def _class_last(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x if axis in (-1, x.ndim - 1) else x.movedim(axis, -1)


def sigmoid_binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-labels log sigmoid(logits) - (1 - labels) log sigmoid(-logits)``, elementwise.

    Example:
        >>> sigmoid_binary_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0]))
        tensor([0.6931])
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, axis: int = -1, where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``-sum(labels * log_softmax(logits))`` over ``axis`` (labels are probabilities).

    ``where``: a boolean mask of the classes that take part (others are ignored).

    Example:
        >>> softmax_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([0.6931])
    """
    logits, labels = _class_last(logits, axis), _class_last(labels.to(logits.dtype), axis)
    if where is None:
        return -torch.sum(labels * F.log_softmax(logits, dim=-1), dim=-1)
    where = _class_last(where, axis)
    log_p = F.log_softmax(logits.masked_fill(~where, float("-inf")), dim=-1)
    return -torch.sum(torch.where(where, labels * log_p, torch.zeros_like(log_p)), dim=-1)


def softmax_cross_entropy_with_integer_labels(logits: torch.Tensor, labels: torch.Tensor, axis: int = -1, where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy with class indices (``torch.nn.functional.cross_entropy(..., reduction="none")``).

    Example:
        >>> softmax_cross_entropy_with_integer_labels(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor([0.6931])
    """
    logits = _class_last(logits, axis)
    if where is not None:
        logits = logits.masked_fill(~_class_last(where, axis), float("-inf"))
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), reduction="none")
    return flat.reshape(labels.shape)


def safe_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`softmax_cross_entropy` that is 0 (not NaN) where a label with zero probability meets a
    ``-inf`` logit.

    Example:
        >>> safe_softmax_cross_entropy(torch.tensor([[0.0, float("-inf")]]), torch.tensor([[1.0, 0.0]]))
        tensor([-0.])
    """
    log_p = F.log_softmax(logits, dim=-1)
    return -torch.sum(torch.where(labels == 0, torch.zeros_like(log_p), labels.to(log_p.dtype) * log_p), dim=-1)


def smooth_labels(labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label smoothing: ``(1 - alpha) labels + alpha / num_classes`` (one-hot or probability labels).

    ``softmax_cross_entropy(logits, smooth_labels(one_hot, a))`` is
    ``torch.nn.functional.cross_entropy(logits, labels, label_smoothing=a)``.

    Example:
        >>> smooth_labels(torch.tensor([[1.0, 0.0]]), 0.2)
        tensor([[0.9000, 0.1000]])
    """
    return (1.0 - alpha) * labels + alpha / labels.shape[-1]


def poly_loss_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 2.0, axis: int = -1, where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PolyLoss (Leng et al., 2022): ``CE + epsilon (1 - p_t)`` with ``p_t = sum(labels * softmax(logits))``.

    Example:
        >>> poly_loss_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), epsilon=0.0)
        tensor([0.6931])
    """
    ce = softmax_cross_entropy(logits, labels, axis=axis, where=where)
    p = F.softmax(_class_last(logits, axis), dim=-1)
    pt = torch.sum(_class_last(labels.to(p.dtype), axis) * p, dim=-1)
    return ce + epsilon * (1.0 - pt)


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: Optional[float] = None, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017), elementwise: ``(1 - p_t)^gamma * BCE``, weighted by ``alpha`` for positives.

    Example:
        >>> sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), gamma=0.0)
        tensor([0.6931])
    """
    labels = labels.to(logits.dtype)
    ce = sigmoid_binary_cross_entropy(logits, labels)
    p = torch.sigmoid(logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * labels + (1 - alpha) * (1 - labels)) * loss
    return loss


def squared_error(predictions: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(predictions - targets)^2`` elementwise (``targets`` default 0; ``F.mse_loss(reduction="none")``).

    Example:
        >>> squared_error(torch.tensor([3.0]), torch.tensor([1.0]))
        tensor([4.])
    """
    return F.mse_loss(predictions, torch.zeros_like(predictions) if targets is None else targets.to(predictions.dtype), reduction="none")


def l2_loss(predictions: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``0.5 * squared_error`` (optax's convention).

    Example:
        >>> l2_loss(torch.tensor([3.0]), torch.tensor([1.0]))
        tensor([2.])
    """
    return 0.5 * squared_error(predictions, targets)


def huber_loss(predictions: torch.Tensor, targets: Optional[torch.Tensor] = None, delta: float = 1.0) -> torch.Tensor:
    """Huber loss: ``0.5 e^2`` for ``|e| <= delta``, else ``delta (|e| - 0.5 delta)`` (``F.huber_loss``).

    Example:
        >>> huber_loss(torch.tensor([3.0]), torch.tensor([1.0]))
        tensor([1.5000])
    """
    return F.huber_loss(predictions, torch.zeros_like(predictions) if targets is None else targets.to(predictions.dtype), reduction="none", delta=delta)


def log_cosh(predictions: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log(cosh(predictions - targets))``, computed stably as ``logaddexp(e, -e) - log 2``.

    Example:
        >>> log_cosh(torch.tensor([0.0]))
        tensor([0.])
    """
    e = predictions if targets is None else predictions - targets
    return torch.logaddexp(e, -e) - math.log(2.0)


def cosine_similarity(predictions: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.0, axis: int = -1) -> torch.Tensor:
    """Cosine of the angle between ``predictions`` and ``targets`` along ``axis`` (norms floored at ``epsilon``).

    Example:
        >>> cosine_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([0.7071])
    """
    def unit(x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x, dim=axis, keepdim=True)
        return x / torch.clamp(n, min=epsilon) if epsilon > 0 else x / n

    return torch.sum(unit(predictions) * unit(targets.to(predictions.dtype)), dim=axis)


def cosine_distance(predictions: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.0, axis: int = -1) -> torch.Tensor:
    """``1 - cosine_similarity``.

    Example:
        >>> cosine_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([0.])
    """
    return 1.0 - cosine_similarity(predictions, targets, epsilon=epsilon, axis=axis)


def hinge_loss(predictor_outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary hinge loss ``max(0, 1 - y f)`` with targets in ``{-1, 1}``.

    Example:
        >>> hinge_loss(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([0.5000, 0.0000])
    """
    return torch.relu(1.0 - predictor_outputs * targets)


def multiclass_hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Crammer-Singer hinge loss: ``max_j (scores_j + 1[j != y]) - scores_y``.

    Example:
        >>> multiclass_hinge_loss(torch.tensor([[2.0, 0.5]]), torch.tensor([0]))
        tensor([0.])
    """
    one_hot = F.one_hot(labels.long(), scores.shape[-1]).to(scores.dtype)
    return torch.amax(scores + 1.0 - one_hot, dim=-1) - torch.sum(scores * one_hot, dim=-1)


def perceptron_loss(predictor_outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary perceptron loss ``max(0, -y f)``.

    Example:
        >>> perceptron_loss(torch.tensor([-0.5]), torch.tensor([1.0]))
        tensor([0.5000])
    """
    return torch.relu(-predictor_outputs * targets)


def multiclass_perceptron_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_j scores_j - scores_y``.

    Example:
        >>> multiclass_perceptron_loss(torch.tensor([[2.0, 3.0]]), torch.tensor([0]))
        tensor([1.])
    """
    one_hot = F.one_hot(labels.long(), scores.shape[-1]).to(scores.dtype)
    return torch.amax(scores, dim=-1) - torch.sum(scores * one_hot, dim=-1)


def kl_divergence(log_predictions: torch.Tensor, targets: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """``KL(targets || predictions)`` summed over ``axis`` (``F.kl_div(..., reduction="none").sum(axis)``).

    Example:
        >>> kl_divergence(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[0.5, 0.5]]))
        tensor([0.])
    """
    return torch.sum(F.kl_div(log_predictions, targets.to(log_predictions.dtype), reduction="none"), dim=axis)


def kl_divergence_with_log_targets(log_predictions: torch.Tensor, log_targets: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """:func:`kl_divergence` with the targets given as log-probabilities.

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> kl_divergence_with_log_targets(lp, lp)
        tensor([0.])
    """
    return torch.sum(F.kl_div(log_predictions, log_targets.to(log_predictions.dtype), reduction="none", log_target=True), dim=axis)


def convex_kl_divergence(log_predictions: torch.Tensor, targets: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """``kl_divergence + sum(exp(log_predictions) - targets)`` (convex in both arguments).

    Example:
        >>> convex_kl_divergence(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[0.5, 0.5]]))
        tensor([0.])
    """
    return kl_divergence(log_predictions, targets, axis=axis) + torch.sum(torch.exp(log_predictions) - targets, dim=axis)


def generalized_kl_divergence(log_predictions: torch.Tensor, targets: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """The generalized KL divergence of unnormalised measures (same formula as :func:`convex_kl_divergence`).

    Example:
        >>> generalized_kl_divergence(torch.log(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0, 2.0]]))
        tensor([0.])
    """
    return convex_kl_divergence(log_predictions, targets, axis=axis)


def ctc_loss(
    logits: torch.Tensor, logit_paddings: torch.Tensor, labels: torch.Tensor, label_paddings: torch.Tensor, blank_id: int = 0, log_epsilon: float = -1e5
) -> torch.Tensor:
    """Connectionist temporal classification loss per sequence, optax's batch-major interface
    (``logits [B, T, K]``, paddings 1.0 where padded) over ``torch.nn.functional.ctc_loss``.

    ``log_epsilon`` is accepted for optax compatibility (torch's kernel works in log space).

    Example:
        >>> logits = torch.zeros(1, 4, 3)
        >>> loss = ctc_loss(logits, torch.zeros(1, 4), torch.tensor([[1, 2]]), torch.zeros(1, 2))
        >>> tuple(loss.shape)
        (1,)
    """
    del log_epsilon
    log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)  # [T, B, K]
    input_lengths = torch.sum(1 - logit_paddings, dim=1).long()
    target_lengths = torch.sum(1 - label_paddings, dim=1).long()
    return F.ctc_loss(log_probs, labels.long(), input_lengths, target_lengths, blank=blank_id, reduction="none", zero_infinity=False)


def triplet_margin_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, axis: int = -1, norm_degree: float = 2, margin: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """``max(0, d(a, p) - d(a, n) + margin)`` with ``d(x, y) = (sum (|x - y| + eps)^norm_degree)^(1/norm_degree)``.

    Example:
        >>> a = torch.zeros(1, 2)
        >>> triplet_margin_loss(a, a, a + 10.0, eps=0.0)
        tensor([0.])
    """
    def dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sum((torch.abs(x - y) + eps) ** norm_degree, dim=axis) ** (1.0 / norm_degree)

    return torch.relu(dist(anchors, positives) - dist(anchors, negatives) + margin)
