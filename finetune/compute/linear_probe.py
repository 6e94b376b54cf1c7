"""A linear head fitted to its optimum on frozen features: L2-regularized logistic regression.

The linear probe as Kornblith et al. (2019) and the LP stage of LP-FT (Kumar et al., 2022) run it:
the loss solved to convergence by full-batch L-BFGS, the L2 strength chosen by k-fold
cross-validation on the training split (:mod:`finetune.compute.l2_choice`). On a frozen backbone
the head's loss is convex, so an optimizer that converges beats epochs of SGD at one fixed
learning rate.

Objective (multiclass: softmax cross-entropy; multilabel: a sigmoid BCE per label, summed over the
labels), on the raw pooled features: the mean loss over the rows plus ``l2 / 2 * |W|^2`` (the bias
is not penalized). That is scikit-learn's ``LogisticRegression(C)`` with ``l2 = 1 / (C * rows)``
(multi-label: one such problem per label). The features are not standardized: a uniform penalty on
raw features keeps the backbone's own scale, where a near-dead channel stays small; standardizing
blows such channels up to unit variance (on 64 px digits a standardized probe scores 0.922, the
raw one 0.947, the same split). The grid is relative to the features' mean square
(:func:`feature_scale`), so it needs no retuning per backbone.

L-BFGS works on centered features all the same: with an unpenalized bias, ``X W^T + b`` equals
``(X - m) W^T + c`` for ``c = b + W m`` and any shift ``m``, so solving for ``(W, c)`` with ``m`` the
features' mean is the same problem (the same optimum, the same ``W``). It is a much better
conditioned one: pooled activations are all positive, and their shared mean direction makes the
loss steep along ``W m`` and flat elsewhere (on 64 px digits, 200 iterations on raw features stop
short of the optimum that 50 reach on centered ones; the cross-validation needs 0.55x the loss
evaluations). Nothing is copied: the shift is applied to the logits.

Written in torch rather than taken from scikit-learn because the same objective is what the
run's L-BFGS epochs minimize (with the epoch table, checkpoints and resume of any run), and the
cross-validation must pick the strength for exactly that objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finetune.compute.task import task_for


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

    def mean(self) -> torch.Tensor:
        """The mean row of the blocks (every row of them, summed in float64), in their dtype: a
        shift for :class:`Problem` (any shift gives the same optimum; a mean conditions it)."""
        total = sum(block.sum(dim=0, dtype=torch.float64) for block in self.blocks)
        return (total / max(sum(len(block) for block in self.blocks), 1)).to(self.blocks[0].dtype)


def centered_bias(weight: torch.Tensor, bias: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The bias giving the same logits on features centered on `center`: ``b + W m`` (module docstring)."""
    return bias + weight @ center


def plain_bias(weight: torch.Tensor, centered: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Back from :func:`centered_bias`: ``c - W m``, the bias for the features as they are."""
    return centered - weight @ center


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
    in the order of the rows), the number of outputs and the loss settings of the run. `center`
    (D,): the shift :func:`fit` solves around (see the module docstring); None: the rows' mean."""

    rows: torch.Tensor | Rows
    targets: torch.Tensor
    outputs: int
    multilabel: bool = False
    class_weights: torch.Tensor | None = None
    label_smoothing: float = 0.0
    center: torch.Tensor | None = None

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self._rows.blocks

    @property
    def _rows(self) -> Rows:
        return self.rows if isinstance(self.rows, Rows) else Rows((self.rows,))

    def shift(self) -> torch.Tensor:
        """`center`, or the rows' mean when none was given."""
        return self._rows.mean() if self.center is None else self.center.to(self.blocks[0].dtype)

    def loss(
        self, weight: torch.Tensor, bias: torch.Tensor, l2: float, center: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The objective at (`weight`, `bias`); with `center`, `bias` is the centered one (``c``)."""
        return penalized_loss(
            self._rows.logits(weight, bias if center is None else plain_bias(weight, bias, center)),
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
    """(weight (C, D), bias (C,)) minimizing `problem`'s objective at `l2`, from `init` (zeros).
    L-BFGS solves for the weight and the centered bias (module docstring); the bias returned is
    the plain one, for the rows as they are."""
    dtype = problem.blocks[0].dtype
    if init is None:
        init = (torch.zeros(problem.outputs, problem.blocks[0].shape[1]), torch.zeros(problem.outputs))
    center = problem.shift()
    weight = init[0].detach().to(dtype, copy=True).requires_grad_(True)
    with torch.no_grad():
        centered = centered_bias(weight, init[1].to(dtype), center).requires_grad_(True)
    optimizer = lbfgs([weight, centered], max_iter, tolerance, grad_tolerance)

    def closure():
        optimizer.zero_grad()
        loss = problem.loss(weight, centered, l2, center)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return weight.detach(), plain_bias(weight, centered, center)


def view_rows(views: torch.Tensor, targets: torch.Tensor, images: np.ndarray | None = None):
    """(rows, targets) of every view of `images` (all when None): `views` is (V, N, D)."""
    if images is not None:
        views, targets = views[:, images], targets[images]
    return views.reshape(-1, views.shape[2]), targets.repeat(views.shape[0], *([1] * (targets.ndim - 1)))


def c_of(l2: float, rows: int) -> float:
    """scikit-learn's ``C`` equal to this module's `l2` on `rows` rows (and back: ``1 / (C * rows)``)."""
    return 1.0 / (l2 * rows)
