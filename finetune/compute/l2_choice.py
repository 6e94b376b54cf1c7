"""The L2 strength of a linear probe chosen by k-fold cross-validation on the training split.

Each strength of the grid is scored by the mean held-out accuracy (or mAP) of the folds' fits of
:mod:`finetune.compute.linear_probe`'s objective; the folds hold out whole images (every view of
them) and walk the grid from the strongest penalty down, each fit warm-started from the one before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finetune.compute.linear_probe import Problem, Rows, feature_scale, fit

# Strengths tried by cross-validation (times the features' mean square): decades from 10 down to
# 1e-6, then the half decades on either side of the best. The strongest matter on small data
# (hymenoptera's 245 photos: 1 to 3), the weakest on easy data (digits: 1e-4).
DEFAULT_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))
# Cross-validation copies the training features once, in fold order, up to this size; above it,
# it copies nothing and pays about 1.5x the arithmetic instead (see _fold_blocks).
FOLD_ORDER_BYTES = 256 * 2**20


def fold_indices(targets: torch.Tensor, folds: int, seed: int, multilabel: bool = False) -> list[np.ndarray]:
    """Held-out image indices of each fold: stratified by class (multiclass), shuffled (multilabel)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    placeholder = np.zeros(len(targets))
    if multilabel:
        return [held for _, held in KFold(folds, shuffle=True, random_state=seed).split(placeholder)]
    return [
        held for _, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(placeholder, targets.numpy())
    ]


def held_out_score(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, views: int = 1
) -> tuple[float, float]:
    """(accuracy, or macro average precision over the labels present (multilabel); mean loss) of
    held-out images whose `views` rows each (view-major: row ``v * n + i``) are scored by their
    averaged probabilities, as test-time augmentation averages them: one augmented crop alone is
    harder than the center crop a model is evaluated on, and would favour too strong a penalty."""
    n = logits.shape[0] // views
    targets = targets[:n]
    if multilabel:
        from sklearn.metrics import average_precision_score

        probabilities = torch.sigmoid(logits.double()).view(views, n, -1).mean(dim=0)
        present = targets.sum(dim=0) > 0
        score = average_precision_score(targets[:, present].numpy(), probabilities[:, present].numpy(), average="macro")
        return float(score), float(F.binary_cross_entropy(probabilities, targets.double()).item())
    probabilities = torch.softmax(logits.double(), dim=1).view(views, n, -1).mean(dim=0)
    return (
        float((probabilities.argmax(dim=1) == targets).double().mean()),
        float(F.nll_loss(probabilities.clamp_min(1e-12).log(), targets).item()),
    )


@dataclass(frozen=True)
class L2Choice:
    """What cross-validation chose: ``l2`` (absolute, the objective's), its ``strength`` (``l2``
    over the features' mean square), its held-out ``score`` (accuracy, or mAP), and the mean
    held-out score of every strength tried (``scores``, in the order of ``grid``)."""

    l2: float
    strength: float
    score: float
    grid: tuple[float, ...]
    scores: tuple[float, ...]
    folds: int

    def as_dict(self) -> dict:
        return {
            "l2": self.l2,
            "strength": self.strength,
            "score": self.score,
            "grid": list(self.grid),
            "scores": list(self.scores),
            "folds": self.folds,
        }


def choose_l2(
    views: torch.Tensor,
    targets: torch.Tensor,
    outputs: int,
    *,
    grid=DEFAULT_GRID,
    folds: int = 3,
    seed: int = 0,
    multilabel: bool = False,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    max_iter: int = 50,
    tolerance: float = 1e-6,
    patience: int = 1,
    refine: bool = True,
) -> L2Choice:
    """The L2 strength with the best mean held-out score over `folds` folds of the training images.

    `views`: (V, N, D) raw features, V views of each of N images; a fold holds out whole
    images (every view of them) and scores each by its views' averaged probabilities. The folds walk `grid` from the
    strongest penalty down, each fit
    starting from the fold's one before (a warm start: the path costs little more than its
    weakest point), and stop once `patience` weaker penalties in a row have scored below the best.
    `refine`: then the points halfway (geometrically) to the best's neighbours are tried too, each
    from the best's solutions. Ties go to the lower held-out loss, then to the stronger penalty.
    `max_iter` and `tolerance` bound each fit (cross-validation needs the ranking, not the last digit).
    """
    if views.ndim == 2:
        views = views[None]
    scale = feature_scale(views)
    center = Rows((views.reshape(-1, views.shape[2]),)).mean()  # one shift for every fold: no pass per fit
    grid = sorted((float(g) for g in grid), reverse=True)
    problems = [
        (Problem(train, train_targets, outputs, multilabel, class_weights, label_smoothing, center), held, held_targets)
        for train, train_targets, held, held_targets in _fold_blocks(views, targets, folds, seed, multilabel)
    ]

    def evaluate(strength: float, starts: list) -> tuple[np.ndarray, list]:
        total, solutions = np.zeros(2), []
        for (problem, held, held_targets), start in zip(problems, starts):
            solutions.append(fit(problem, strength * scale, start, max_iter, tolerance, 100 * tolerance))
            total += held_out_score(held.logits(*solutions[-1]), held_targets, multilabel, views.shape[0])
        return total / len(problems), solutions

    tried, solutions = _walk(grid, evaluate, len(problems), patience)
    if refine and len(grid) > 1:
        _refine(grid, tried, solutions, evaluate)
    order = sorted(tried, reverse=True)
    best = max(order, key=lambda g: (tried[g][0], -tried[g][1], g))
    return L2Choice(
        best * scale, best, float(tried[best][0]), tuple(order), tuple(float(tried[g][0]) for g in order), folds
    )


def _fold_blocks(views: torch.Tensor, targets: torch.Tensor, folds: int, seed: int, multilabel: bool):
    """Per fold: (training :class:`Rows`, their targets, held-out Rows (view-major), their targets),
    never a copy of the features per fold (at 80,000 images x 2 views those copies took 2 GB).
    Up to FOLD_ORDER_BYTES of features, the images are put in fold order once (one copy), so that
    a fold's held-out images are one run of rows and its training images the runs around it.
    Above it, no copy at all: every fit computes the logits of all rows and indexes its own (about
    1.5x the arithmetic of the copy)."""
    held_out = fold_indices(targets, folds, seed, multilabel)
    n = views.shape[1]
    if views.numel() * views.element_size() > FOLD_ORDER_BYTES:
        every = Rows((views.reshape(-1, views.shape[2]),))  # a view of the contiguous (V, N, D) cache
        offsets = torch.arange(views.shape[0])[:, None] * n
        for held in held_out:
            train = torch.from_numpy(np.setdiff1d(np.arange(n), held))
            held = torch.from_numpy(held)
            yield (
                Rows(every.blocks, (offsets + train).reshape(-1)),
                targets[train].repeat(len(views), *([1] * (targets.ndim - 1))),
                Rows(every.blocks, (offsets + held).reshape(-1)),
                targets[held],
            )
        return
    order = torch.from_numpy(np.concatenate(held_out))
    ordered, ordered_targets = views[:, order], targets[order]
    start = 0
    for held in held_out:
        end = start + len(held)
        train = tuple(part for view in ordered for part in (view[:start], view[end:]) if len(part))
        train_targets = torch.cat([ordered_targets[:start], ordered_targets[end:]] * len(ordered))
        yield Rows(train), train_targets, Rows(tuple(view[start:end] for view in ordered)), ordered_targets[start:end]
        start = end


def _walk(grid: list[float], evaluate, folds: int, patience: int) -> tuple[dict, dict]:
    """(mean held-out (score, loss) per strength tried, the folds' solutions per strength): `grid`
    from the strongest penalty down, each fit warm-started from the one before, every fold in step
    so that the walk can stop once `patience` weaker penalties have scored below the best."""
    tried, solutions, starts = {}, {}, [None] * folds
    for strength in grid:
        tried[strength], starts = evaluate(strength, starts)
        solutions[strength] = starts
        peak = max(tried, key=lambda g: tried[g][0])
        if sum(1 for g in tried if g < peak) >= patience:  # `patience` weaker penalties, none as good
            break
    return tried, solutions


def _refine(grid: list[float], tried: dict, solutions: dict, evaluate) -> None:
    """Add to `tried` the points halfway (geometrically) between the best strength and its grid
    neighbours, each fit from the best's solutions."""
    best = max(tried, key=lambda g: (tried[g][0], -tried[g][1], g))
    i = grid.index(best)
    for neighbour in [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]:
        between = float(np.sqrt(best * neighbour))
        tried[between] = evaluate(between, solutions[best])[0]
