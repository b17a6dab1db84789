"""Classification metrics on gathered predictions: top-k accuracy and mean average precision."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import Tensor


def topk_accuracy(scores: Tensor, targets: Tensor, k: int = 1) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores.

    ``scores: (N, C)`` (logits or probabilities), ``targets: (N,)`` integer labels.
    """
    if scores.shape[0] == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == targets.unsqueeze(1)).any(dim=1).double().mean())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of the one-vs-rest average precision, for *every* class present.

    ``scores: (N, C)`` class scores (higher = more likely), ``targets: (N,)``. A class with no
    positive example in ``targets`` has no defined AP and is left out; every other class counts
    (the reference implementation averaged only the first 6 classes). AP is scikit-learn's
    (step-wise area under the precision-recall curve, no interpolation).
    """
    y = targets.cpu().numpy()
    s = scores.detach().double().cpu().numpy()
    present = np.unique(y)
    if present.size == 0:
        return float("nan")
    aps = [average_precision_score(y == c, s[:, c]) for c in present]
    return float(np.mean(aps))


def classification_metrics(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1,)) -> dict:
    """``{"top{k}": ..., "mAP": ...}`` from logits ``(N, C)``; AP ranks softmax probabilities."""
    out = {f"top{k}": topk_accuracy(logits, targets, k) for k in ks}
    out["mAP"] = mean_average_precision(torch.softmax(logits.double(), dim=1), targets)
    return out
