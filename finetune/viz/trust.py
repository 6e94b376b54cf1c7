"""Pictures of how far a multi-class model's confidence can be trusted.

- :func:`reliability`: the reliability diagram (DeGroot & Fienberg 1983; Guo et al. 2017) before
  and after temperature scaling: per confidence bin, how often the model is right against how sure
  it said it was (on the diagonal: calibrated; below it: over-confident), with ECE in the titles
  and how many images fall in each bin.
- :func:`risk_coverage`: selective classification (Geifman & El-Yaniv 2017): answering only the
  images above a confidence threshold, the error rate among the answered ones against the share
  answered; the abstain threshold in use, if any, is marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetune.use.calibration import ECE_BINS, calibration_scores, reliability_bins  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def reliability(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path, split: str = "validation"
) -> Path:
    """Two reliability diagrams side by side: softmax(logits) and softmax(logits / temperature)."""
    panels = [("softmax", logits.softmax(dim=1))]
    if temperature != 1.0:
        panels.append((f"calibrated (T = {temperature:.2f})", (logits / temperature).softmax(dim=1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    width = 1.0 / ECE_BINS
    for ax, (name, probabilities) in zip(axes[0], panels):
        bins = reliability_bins(probabilities, labels)
        scores = calibration_scores(probabilities, labels)
        lows = np.array([b["low"] for b in bins])
        accuracy = np.array([b["accuracy"] for b in bins])
        confidence = np.array([b["confidence"] for b in bins])
        filled = ~np.isnan(accuracy)
        ax.bar(
            lows[filled],
            accuracy[filled],
            width=width,
            align="edge",
            color="#4c72b0",
            edgecolor="white",
            label="accuracy",
        )
        # the gap between accuracy and confidence: above the bar over-confident, inside it under-confident
        ax.bar(
            lows[filled],
            np.abs(confidence - accuracy)[filled],
            bottom=np.minimum(confidence, accuracy)[filled],
            width=width,
            align="edge",
            color="#dd8452",
            alpha=0.6,
            edgecolor="white",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        for low, bin_ in zip(lows, bins):
            if bin_["count"]:
                ax.text(low + width / 2, 0.02, str(bin_["count"]), ha="center", fontsize=6, color="white", rotation=90)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (top-class probability)",
            ylabel="accuracy",
            title=f"{name}\nECE {scores['ece']:.3f}, NLL {scores['nll']:.3f}, Brier {scores['brier']:.3f}",
        )
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        f"Reliability on {len(labels)} {split} images ({ECE_BINS} bins; white: images per bin)", fontsize=10, y=1.04
    )
    return _save(fig, path)


def risk_coverage(
    probabilities: torch.Tensor, labels: torch.Tensor, path: Path, min_confidence: float | None = None
) -> Path:
    """Error among the answered images against the share answered, answering the most confident first."""
    confidence, predicted = probabilities.max(dim=1)
    order = torch.argsort(confidence, descending=True)
    wrong = (predicted != labels)[order].double()
    answered = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    risk = (wrong.cumsum(0) / answered).numpy()
    coverage = (answered / max(len(labels), 1)).numpy()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot(coverage, risk, color="#4c72b0")
    if min_confidence is not None and len(labels):
        accepted = confidence >= min_confidence
        share = float(accepted.double().mean())
        error = float((predicted != labels)[accepted].double().mean()) if accepted.any() else 0.0
        ax.scatter(
            [share],
            [error],
            color="#c44e52",
            zorder=3,
            label=f"min_confidence {min_confidence:.3f}: {share:.0%} answered, {error:.1%} wrong",
        )
        ax.legend(loc="upper left", fontsize=8)
    ax.set(
        xlim=(0, 1),
        ylim=(0, max(0.05, float(risk.max()) * 1.1) if len(risk) else 1),
        xlabel="coverage (share of images answered, most confident first)",
        ylabel="error among answered",
        title=f"Risk-coverage on {len(labels)} images (full coverage: {risk[-1] if len(risk) else 0:.1%} wrong)",
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


__all__ = ["reliability", "risk_coverage"]
