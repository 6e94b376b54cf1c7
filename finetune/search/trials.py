"""One trial of ``finetune auto`` (:mod:`finetune.search.auto`): its config (a backbone, a recipe,
factors on the recipe's learning rate and weight decay), its run in ``OUT/trials/N`` with one line
on the screen, and what the study is told (the score, pruned, or failed)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def run_trial(
    trial, study, overrides: Sequence[str], out: Path, backbones: Sequence[str], recipes: Sequence[str], left: float
) -> None:
    """Run `trial` of `study` with `left` seconds of the budget, then tell the study its outcome."""
    from optuna.trial import TrialState

    from finetune.search.storage import Heartbeats
    from finetune.train.history import monitored
    from finetune.train.run import run

    folder = out / "trials" / str(trial.number)
    cfg = _trial_config(trial, overrides, folder, backbones, recipes, left)
    backbone, recipe = trial.params["backbone"], trial.params["recipe"]
    reporter = _Reporter(trial, monitored(cfg))
    started = time.time()
    try:
        with _quiet(), Heartbeats(study, [trial]):  # a shared study's: the trial is alive
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
        cfg.optimizer.weight_decay,
        result.objective,
        score if score is not None else float("nan"),
        reporter.epochs,
        f" ({state})" if state else "",
        seconds,
    )


def _trial_config(
    trial, overrides: Sequence[str], folder: Path, backbones: Sequence[str], recipes: Sequence[str], left: float
):
    """The trial's run config: what it suggests on top of `overrides`, kept in its user attrs."""
    from omegaconf import open_dict

    from finetune.config import compose_config

    backbone = trial.suggest_categorical("backbone", list(backbones))
    recipe = trial.suggest_categorical("recipe", list(recipes))
    lr_scale = trial.suggest_float("lr_scale", 1 / 3, 3.0, log=True)
    wd_scale = trial.suggest_float("wd_scale", 0.1, 10.0, log=True)
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
        if cfg.logger.get("mlflow") and not cfg.logger.mlflow.get("group"):
            cfg.logger.mlflow.group = str(folder.parent.parent.resolve())  # one MLflow store for the search
    trial.set_user_attr("lr", cfg.optimizer.lr if isinstance(cfg.optimizer.lr, float) else str(cfg.optimizer.lr))
    trial.set_user_attr("weight_decay", cfg.optimizer.weight_decay)
    trial.set_user_attr("folder", str(folder))
    return cfg


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


def epoch_seconds(study) -> float:
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
    from finetune.console import console_handlers, setup

    setup()
    console = console_handlers()
    levels = [h.level for h in console]
    for handler in console:
        handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler, level in zip(console, levels):
            handler.setLevel(level)
