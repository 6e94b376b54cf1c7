"""Calibrated confidence for multi-class models: temperature scaling and the scores that judge it.

A fine-tuned network's softmax is over-confident (Guo et al. 2017, "On Calibration of Modern
Neural Networks"). Temperature scaling divides every logit by one number T > 0 fitted on held-out
data by minimizing the negative log-likelihood; the predicted class never changes (argmax is
invariant to a positive scale), only how sure the model says it is.

Scores (lower is better for all three): ECE, the expected calibration error of the top-class
confidence over 15 equal-width bins (torchmetrics' ``multiclass_calibration_error``, L1 norm);
NLL, the mean negative log-likelihood of the true class; Brier, the mean over images of the
squared distance between the probability vector and the one-hot truth (summed over classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
# T is searched as exp(log_t) within these bounds: below 0.05 or above 20 the logits say nothing
# the data could have taught (a model that needs more is broken, not over-confident).
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the mean NLL of ``softmax(logits / T)`` on (`logits` (N, C), `labels` (N,)).

    NLL in log T is smooth and convex for a fixed set of logits, so LBFGS from T = 1 finds it in
    a few steps; the result is clamped to [0.05, 20]. No images, or no image misclassified: 1.0
    (with every image right the NLL only falls as T falls to 0, so there is no minimum, and a
    model sharpened to 0/1 probabilities by a small, easy validation split is not calibrated)."""
    logits, labels = logits.detach().double(), labels.detach().long()
    if not len(labels) or bool((logits.argmax(dim=1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(*_LOG_T_RANGE).exp())


def calibration_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"ece", "nll", "brier"}`` of class `probabilities` (N, C, rows summing to 1) against
    `labels` (N,). No images: every score 0."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if not len(labels):
        return {"ece": 0.0, "nll": 0.0, "brier": 0.0}
    probabilities, labels = probabilities.double(), labels.long()
    n_classes = probabilities.shape[1]
    ece = multiclass_calibration_error(probabilities.float(), labels, num_classes=n_classes, n_bins=ECE_BINS, norm="l1")
    true_class = probabilities.gather(1, labels[:, None]).squeeze(1)
    nll = -true_class.clamp_min(torch.finfo(torch.float64).tiny).log().mean()
    brier = ((probabilities - F.one_hot(labels, n_classes).double()) ** 2).sum(dim=1).mean()
    return {"ece": float(ece), "nll": float(nll), "brier": float(brier)}


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's data: per equal-width bin of top-class confidence, ``{"low",
    "high", "count", "confidence", "accuracy"}`` (mean confidence and accuracy of the images in
    it; empty bins have count 0 and NaN means)."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # torchmetrics' binning: bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0.
    index = (torch.bucketize(confidence.double(), edges, right=False) - 1).clamp(0, bins - 1)
    rows = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        rows.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": count,
                "confidence": float(confidence[mask].double().mean()) if count else float("nan"),
                "accuracy": float(correct[mask].mean()) if count else float("nan"),
            }
        )
    return rows


__all__ = ["ECE_BINS", "calibration_scores", "fit_temperature", "reliability_bins"]
