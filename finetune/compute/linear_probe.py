"""A linear head fitted to its optimum on frozen features: L2-regularized logistic regression.

The linear probe as Kornblith et al. (2019) and the LP stage of LP-FT (Kumar et al., 2022) run it:
the loss solved to convergence by full-batch L-BFGS, the L2 strength chosen by k-fold
cross-validation on the training split. On a frozen backbone the head's loss is convex, so an
optimizer that converges beats epochs of SGD at one fixed learning rate.

Objective (multiclass: softmax cross-entropy; multilabel: a sigmoid BCE per label, summed over the
labels), on the raw pooled features: the mean loss over the rows plus ``l2 / 2 * |W|^2`` (the bias
is not penalized). That is scikit-learn's ``LogisticRegression(C)`` with ``l2 = 1 / (C * rows)``
(multi-label: one such problem per label). The features are not standardized: a uniform penalty on
raw features keeps the backbone's own scale, where a near-dead channel stays small; standardizing
blows such channels up to unit variance (on 64 px digits a standardized probe scores 0.922, the
raw one 0.947, the same split). The grid is relative to the features' mean square
(:func:`feature_scale`), so it needs no retuning per backbone.

Written in torch rather than taken from scikit-learn because the same objective is what the
run's L-BFGS epochs minimize (with the epoch table, checkpoints and resume of any run), and the
cross-validation must pick the strength for exactly that objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finetune.compute.task import task_for

# Strengths tried by cross-validation (times the features' mean square): decades from 10 down to
# 1e-6, then the half decades on either side of the best. The strongest matter on small data
# (hymenoptera's 245 photos: 1 to 3), the weakest on easy data (digits: 1e-4).
DEFAULT_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))
# Cross-validation copies the training features once, in fold order, up to this size; above it,
# it copies nothing and pays about 1.5x the arithmetic instead (see _fold_blocks).
FOLD_ORDER_BYTES = 256 * 2**20


def feature_scale(rows: torch.Tensor) -> float:
    """The mean squared feature value of `rows` (N, D): the strengths of the grid are multiples
    of it, so features ten times larger need no other grid (their weights are ten times smaller).
    Summed in float64 a slice at a time: no float64 copy of the whole cache."""
    flat = rows.reshape(-1)
    total = sum(float(part.double().pow(2).sum()) for part in flat.split(1 << 22))
    return max(total / max(flat.numel(), 1), 1e-12)


def penalized_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    l2: float,
    multilabel: bool = False,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The objective of the module docstring. `class_weights` weight each row's loss by its class
    (multiclass; a weighted mean, as ``F.cross_entropy`` takes it) or each label's positives
    (multilabel: BCE's ``pos_weight``). `label_smoothing` as the run's loss applies it: the data
    term is the task's own loss (:mod:`finetune.compute.task`), the one a training run minimizes."""
    data = task_for(multilabel).loss(logits, targets, class_weights=class_weights, label_smoothing=label_smoothing)
    return data + 0.5 * l2 * weight.pow(2).sum()


@dataclass(frozen=True)
class Rows:
    """Rows of features taken without copying them: `blocks` of rows, in order (views into a
    larger tensor), and optionally `index`, the rows of those blocks used, in its order."""

    blocks: tuple[torch.Tensor, ...]
    index: torch.Tensor | None = None

    def logits(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The linear head's logits of the rows (only the small logits are joined or indexed)."""
        logits = torch.cat([block @ weight.T for block in self.blocks])
        return (logits if self.index is None else logits[self.index]) + bias


def lbfgs(params, max_iter: int, tolerance: float = 1e-10, grad_tolerance: float = 1e-6) -> torch.optim.LBFGS:
    """The optimizer of every fit here: strong-Wolfe line search, so no learning rate to tune.
    It stops after `max_iter` iterations, when the loss or the weights change by less than
    `tolerance` in one, or when no gradient entry is larger than `grad_tolerance`."""
    return torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=grad_tolerance,
        tolerance_change=tolerance,
    )


@dataclass(frozen=True)
class Problem:
    """One logistic-regression problem: `rows` (N, D), or :class:`Rows` (cross-validation's folds
    without copies of the features), `targets` (class indices, or multi-hot rows for multilabel,
    in the order of the rows), the number of outputs and the loss settings of the run."""

    rows: torch.Tensor | Rows
    targets: torch.Tensor
    outputs: int
    multilabel: bool = False
    class_weights: torch.Tensor | None = None
    label_smoothing: float = 0.0

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self._rows.blocks

    @property
    def _rows(self) -> Rows:
        return self.rows if isinstance(self.rows, Rows) else Rows((self.rows,))

    def loss(self, weight: torch.Tensor, bias: torch.Tensor, l2: float) -> torch.Tensor:
        return penalized_loss(
            self._rows.logits(weight, bias),
            self.targets,
            weight,
            l2,
            self.multilabel,
            self.class_weights,
            self.label_smoothing,
        )


def fit(
    problem: Problem,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-10,
    grad_tolerance: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) minimizing `problem`'s objective at `l2`, from `init` (zeros)."""
    dtype = problem.blocks[0].dtype
    if init is None:
        init = (torch.zeros(problem.outputs, problem.blocks[0].shape[1]), torch.zeros(problem.outputs))
    weight = init[0].detach().to(dtype, copy=True).requires_grad_(True)
    bias = init[1].detach().to(dtype, copy=True).requires_grad_(True)
    optimizer = lbfgs([weight, bias], max_iter, tolerance, grad_tolerance)

    def closure():
        optimizer.zero_grad()
        loss = problem.loss(weight, bias, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


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


def view_rows(views: torch.Tensor, targets: torch.Tensor, images: np.ndarray | None = None):
    """(rows, targets) of every view of `images` (all when None): `views` is (V, N, D)."""
    if images is not None:
        views, targets = views[:, images], targets[images]
    return views.reshape(-1, views.shape[2]), targets.repeat(views.shape[0], *([1] * (targets.ndim - 1)))


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
    grid = sorted((float(g) for g in grid), reverse=True)
    problems = [
        (Problem(train, train_targets, outputs, multilabel, class_weights, label_smoothing), held, held_targets)
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


def c_of(l2: float, rows: int) -> float:
    """scikit-learn's ``C`` equal to this module's `l2` on `rows` rows (and back: ``1 / (C * rows)``)."""
    return 1.0 / (l2 * rows)
