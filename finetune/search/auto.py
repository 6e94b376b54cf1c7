"""``finetune auto``: the backbone, the recipe and its learning rate and weight decay, chosen
within a wall-time budget.

The contract:

1. Rank the candidate backbones on this data's frozen features (:mod:`finetune.use.transfer`,
   the same scores as ``finetune rank``) and keep the ``top`` best by k-fold linear-probe accuracy.
2. An Optuna study (TPE, seeded; Hyperband pruning on each epoch's validation score) proposes
   trials: a kept backbone, a recipe of ``recipes``, a factor on that recipe's own learning rate
   (1/3 to 3) and one on its weight decay (1/10 to 10), both on a log scale. The first two trials
   are the first two recipes as shipped (both factors 1) on the best-ranked backbone. Each trial is a real run
   in ``OUT/trials/N`` (no pictures); a pruned one stops at the end of its epoch.
3. The budget is wall time from the start (ranking included): a trial starts only while the
   budget leaves room for one epoch of it, and is stopped by Lightning's ``max_time`` when the
   budget runs out (its best checkpoint so far counts). The best trial's weights are the result
   (``OUT/best.ckpt``, a copy); nothing is trained again.
4. ``OUT/leaderboard.csv`` ranks every trial (backbone, recipe, lr, weight decay, the score,
   state, seconds). The study lives in ``OUT/auto.db`` with the time spent: ``resume=true`` in
   the same folder goes on from there, finished trials are not run again, and a trial cut off
   by a kill is recorded as failed.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_RECIPES = ("freeze_all_but_head", "lp_ft", "gradual_unfreeze", "discriminative_lr", "full_finetune")
LEADERBOARD_FIELDS = (
    "trial",
    "backbone",
    "recipe",
    "lr",
    "weight_decay",
    "score",
    "state",
    "epochs",
    "seconds",
    "checkpoint",
)


@dataclass(frozen=True)
class AutoResult:
    """What ``finetune auto`` found: the best ``checkpoint`` (None when no trial finished), its
    ``score`` (the monitored validation metric), the ``leaderboard`` rows, best first."""

    checkpoint: Path | None
    score: float | None
    leaderboard: list[dict]
    folder: Path
    seconds: float


def parse_budget(text: str) -> float:
    """Seconds in ``90s``, ``10m``, ``1.5h`` or a plain number of seconds; a ConfigError otherwise."""
    text = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise ConfigError(f"time_budget={text!r}: give a duration such as 90s, 10m or 1.5h.") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time_budget={text!r}: the budget must be a positive duration.")
    return seconds


def search(
    overrides: Sequence[str],
    out: Path,
    budget: float,
    backbones: Sequence[str],
    top: int,
    recipes: Sequence[str],
    resume: bool,
    seed: int,
    rank,
    logger_cfg=None,
) -> AutoResult:
    """Run the search of the module docstring in `out`; `rank(backbones)` gives the ranking rows
    (dicts with ``backbone`` and ``linear``), called once per folder. With W&B on in `logger_cfg`
    (the ``logger`` config) the leaderboard is also a W&B table."""
    import optuna
    from optuna.trial import TrialState

    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'auto.db'}"
    exists = (out / "auto.db").is_file()
    if exists and not resume:
        raise ConfigError(f"{out} already holds an auto search: resume=true to go on with it, or another out=.")
    if resume and not exists:
        raise ConfigError(f"resume=true: {out} holds no auto search (auto.db) to go on with.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="auto",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1),
    )
    started = time.time() - float(study.user_attrs.get("seconds", 0.0))
    for trial in study.get_trials(states=(TrialState.RUNNING,)):  # killed while it ran
        study.tell(trial.number, state=TrialState.FAIL)
    kept = study.user_attrs.get("backbones")
    if kept is None:
        rows = rank(list(backbones))
        kept = [r["backbone"] for r in sorted(rows, key=lambda r: -r["linear"])[:top]]
        study.set_user_attr("backbones", kept)
        study.set_user_attr("seconds", time.time() - started)
        # The recipes as shipped come first, on the best-ranked backbone: the search starts from
        # what a user would have run by hand, so that it can only add to it.
        for recipe in recipes[:2]:
            study.enqueue_trial({"backbone": kept[0], "recipe": recipe, "lr_scale": 1.0, "wd_scale": 1.0})
    log.info(
        "auto: trying %s with %s; budget %.0f s, %.0f s left",
        ", ".join(kept),
        ", ".join(recipes),
        budget,
        budget - (time.time() - started),
    )
    while True:
        left = budget - (time.time() - started)
        epoch_estimate = _epoch_seconds(study)
        if left < max(10.0, epoch_estimate):
            break
        trial = study.ask()
        _run_trial(trial, study, overrides, out, kept, recipes, left)
        study.set_user_attr("seconds", time.time() - started)
    board = leaderboard(study)
    _write_leaderboard(board, out / "leaderboard.csv")
    from finetune.train.loggers import log_table

    log_table(
        logger_cfg,
        out,
        "leaderboard",
        list(LEADERBOARD_FIELDS),
        [[row[field] for field in LEADERBOARD_FIELDS] for row in board],
    )
    best = next((row for row in board if row["state"] == "COMPLETE" and row["checkpoint"]), None)
    checkpoint = None
    if best is not None:
        checkpoint = out / "best.ckpt"
        shutil.copyfile(best["checkpoint"], checkpoint)
    return AutoResult(checkpoint, best["score"] if best else None, board, out, time.time() - started)


def _run_trial(
    trial, study, overrides: Sequence[str], out: Path, backbones: Sequence[str], recipes: Sequence[str], left: float
) -> None:
    from omegaconf import open_dict
    from optuna.trial import TrialState

    from finetune.config import compose_config
    from finetune.train.history import monitored
    from finetune.train.run import run

    backbone = trial.suggest_categorical("backbone", list(backbones))
    recipe = trial.suggest_categorical("recipe", list(recipes))
    lr_scale = trial.suggest_float("lr_scale", 1 / 3, 3.0, log=True)
    wd_scale = trial.suggest_float("wd_scale", 0.1, 10.0, log=True)
    folder = out / "trials" / str(trial.number)
    # Lightning stops at max_time; what follows training (the best epoch's metrics, calibration) needs a little more.
    max_time = max(1, int(left * 0.9 - 5))
    cfg = compose_config(
        [
            *overrides,
            f"+recipe={recipe}",
            f"backbone.name={backbone}",
            "viz=none",
            "callbacks.progress_bar=false",
            f"+trainer.max_time={{seconds: {max_time}}}",
            f"paths.output_dir={folder}",
        ]
    )
    with open_dict(cfg):
        if isinstance(cfg.optimizer.lr, (int, float)):  # optimizer.lr=auto (the lr finder) stays auto
            cfg.optimizer.lr = float(cfg.optimizer.lr) * lr_scale
        cfg.optimizer.weight_decay = float(cfg.optimizer.weight_decay) * wd_scale
    weight_decay = cfg.optimizer.weight_decay
    trial.set_user_attr("lr", cfg.optimizer.lr if isinstance(cfg.optimizer.lr, float) else str(cfg.optimizer.lr))
    trial.set_user_attr("weight_decay", weight_decay)
    trial.set_user_attr("folder", str(folder))
    reporter = _Reporter(trial, monitored(cfg))
    started = time.time()
    try:
        with _quiet():
            result = run(cfg, callbacks=[reporter])
    except Exception as err:  # noqa: BLE001 - a failing trial is recorded and the search goes on
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
        trial.set_user_attr("seconds", time.time() - started)
        study.tell(trial, state=TrialState.FAIL)
        log.info("trial %d: %s %s failed: %s", trial.number, backbone, recipe, f"{type(err).__name__}: {err}"[:200])
        return
    seconds = time.time() - started
    score = result.metrics.get(result.objective)
    trial.set_user_attr("seconds", seconds)
    trial.set_user_attr("epochs", reporter.epochs)
    trial.set_user_attr("checkpoint", str(result.best_checkpoint) if result.best_checkpoint else "")
    if score is None or not math.isfinite(score):
        study.tell(trial, state=TrialState.FAIL)
    elif reporter.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, score)
    state = "pruned" if reporter.pruned else ""
    log.info(
        "trial %d: %-22s %-20s lr %.2g wd %.1e -> %s %.4f after %d epochs%s, %.0f s",
        trial.number,
        backbone,
        recipe,
        trial.user_attrs["lr"] if isinstance(trial.user_attrs["lr"], float) else float("nan"),
        weight_decay,
        result.objective,
        score if score is not None else float("nan"),
        reporter.epochs,
        f" ({state})" if state else "",
        seconds,
    )


class _Reporter(Callback):
    """Each epoch's validation score goes to the trial; Hyperband's verdict stops the run at the
    end of that epoch (``trainer.should_stop``), its best checkpoint kept."""

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor, self.pruned, self.epochs = trial, monitor, False, 0

    def on_validation_epoch_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.epochs = trainer.current_epoch + 1
        self.trial.report(float(value), step=self.epochs)
        if self.trial.should_prune():
            self.pruned, trainer.should_stop = True, True


def _epoch_seconds(study) -> float:
    """The shortest seconds per epoch a finished trial took (0 before any)."""
    rates = [
        t.user_attrs["seconds"] / t.user_attrs["epochs"]
        for t in study.trials
        if t.user_attrs.get("epochs") and t.user_attrs.get("seconds")
    ]
    return min(rates, default=0.0)


@contextmanager
def _quiet():
    """The trials' own start tables, epoch rows and warnings go to their finetune.log, not the
    screen: one line per trial is printed instead."""
    from finetune.console import setup

    setup()
    console = [h for h in logging.getLogger("finetune").handlers if getattr(h, "_finetune_console", False)]
    levels = [h.level for h in console]
    for handler in console:
        handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler, level in zip(console, levels):
            handler.setLevel(level)


def leaderboard(study) -> list[dict]:
    """One row per trial that ran (:data:`LEADERBOARD_FIELDS`), finished trials by score, then the rest."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=[s for s in TrialState if s != TrialState.WAITING]):
        score = (
            t.value if t.value is not None else (max(t.intermediate_values.values()) if t.intermediate_values else None)
        )
        rows.append(
            {
                "trial": t.number,
                "backbone": t.params.get("backbone"),
                "recipe": t.params.get("recipe"),
                "lr": t.user_attrs.get("lr"),
                "weight_decay": t.user_attrs.get("weight_decay"),
                "score": score,
                "state": t.state.name,
                "epochs": t.user_attrs.get("epochs"),
                "seconds": round(t.user_attrs.get("seconds", 0.0), 1),
                "checkpoint": t.user_attrs.get("checkpoint", ""),
            }
        )
    order = {"COMPLETE": 0, "PRUNED": 1}
    return sorted(rows, key=lambda r: (order.get(r["state"], 2), -(r["score"] if r["score"] is not None else -1)))


def _write_leaderboard(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, LEADERBOARD_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
