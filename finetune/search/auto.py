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
5. ``storage=postgresql://...`` keeps the study (named ``study_name``, ``auto``) in a database
   server instead, shared by every ``finetune auto`` that names it (other machines): the first
   ranks the backbones, the others take its choice; each spends its own budget on the study's
   trials, its running trials send heartbeats, and a killed worker's trial is told FAIL and run
   again by another (:mod:`finetune.search.storage`). Each worker writes the study-wide leaderboard
   to its own ``OUT``.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError
from finetune.search.auto_result import AutoResult

log = logging.getLogger(__name__)

DEFAULT_RECIPES = ("freeze_all_but_head", "lp_ft", "gradual_unfreeze", "discriminative_lr", "full_finetune")
# A shared study's running trials send a heartbeat every HEARTBEAT seconds; one silent for twice as
# long (its worker killed) is failed and run again by the next worker that asks for a trial.
HEARTBEAT = 5
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


@dataclass(frozen=True)
class AutoSettings:
    """What a search tries: ``budget`` seconds of wall time, the ``top`` of ``backbones`` by
    ranking, ``recipes``; ``resume`` goes on with the search in the folder; ``seed`` seeds TPE;
    ``folds`` for the ranking; ``logger``: the run config's ``logger`` (a W&B table when on)."""

    budget: float
    backbones: Sequence[str]
    top: int = 2
    recipes: Sequence[str] = DEFAULT_RECIPES
    resume: bool = False
    seed: int = 0
    folds: int = 5
    logger: Any = None
    storage: str | None = None
    study_name: str = "auto"


def auto_settings(opts: dict, overrides: Sequence[str], budget: float, resume: bool) -> tuple[AutoSettings, Any]:
    """``finetune auto``'s settings from its options (``auto.top``, ``auto.folds``, ``auto.recipes``,
    ``auto.backbones``, ``out``: strings or None) and the config `overrides` compose, which comes
    second; a ConfigError names the first option that will not do."""
    from finetune.config import compose_config, recipes_dir
    from finetune.search.rank import backbone_names, name_list

    try:
        top, folds = int(opts["auto.top"]), int(opts["auto.folds"])
    except ValueError:
        raise ConfigError(
            f"auto.top={opts['auto.top']!r} and auto.folds={opts['auto.folds']!r} must be whole numbers."
        ) from None
    if top < 1 or folds < 2:
        raise ConfigError(f"auto.top={top} must be at least 1 and auto.folds={folds} at least 2.")
    recipes = (
        name_list(opts["auto.recipes"], "auto.recipes", "give recipe names, e.g. auto.recipes=[lp_ft,full_finetune]")
        if opts["auto.recipes"]
        else list(DEFAULT_RECIPES)
    )
    known = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise ConfigError(f"auto.recipes: no recipe {', '.join(unknown)}; the recipes are {', '.join(known)}.")
    cfg = compose_config(overrides)
    if cfg.get("task") == "multilabel":
        raise ConfigError(
            "finetune auto ranks backbones by one class per image; multi-label data are not "
            "supported yet: tune them with finetune -m +hparams_search=optuna task=multilabel."
        )
    names = backbone_names(opts["auto.backbones"])
    if opts["out"] is None and resume:
        raise ConfigError("resume=true needs out=DIR: the folder of the search to go on with.")
    settings = AutoSettings(
        budget,
        names,
        top,
        recipes,
        resume,
        int(cfg.seed),
        folds,
        cfg.get("logger"),
        storage=opts.get("storage") or None,
        study_name=opts.get("study_name") or "auto",
    )
    return settings, cfg


def search(overrides: Sequence[str], out: Path, settings: AutoSettings, rank) -> AutoResult:
    """Run the search of the module docstring in `out`; `rank(backbones)` gives the ranking rows
    (dicts with ``backbone`` and ``linear``), called once per folder. With W&B on in
    ``settings.logger`` the leaderboard is also a W&B table."""
    from finetune.search.trials import epoch_seconds, run_trial

    study = _open_study(out, settings)
    # A shared study's workers each spend their own budget; a study of one goes on with its time.
    started = time.time() - (0.0 if settings.storage else float(study.user_attrs.get("seconds", 0.0)))
    kept = study.user_attrs.get("backbones")
    if kept is None:
        rows = rank(list(settings.backbones))
        kept = [r["backbone"] for r in sorted(rows, key=lambda r: -r["linear"])[: settings.top]]
        study.set_user_attr("backbones", kept)
        study.set_user_attr("seconds", time.time() - started)
        # The recipes as shipped come first, on the best-ranked backbone: the search starts from
        # what a user would have run by hand, so that it can only add to it.
        for recipe in settings.recipes[:2]:
            study.enqueue_trial({"backbone": kept[0], "recipe": recipe, "lr_scale": 1.0, "wd_scale": 1.0})
    log.info(
        "auto: trying %s with %s; budget %.0f s, %.0f s left",
        ", ".join(kept),
        ", ".join(settings.recipes),
        settings.budget,
        settings.budget - (time.time() - started),
    )
    while True:
        left = settings.budget - (time.time() - started)
        if left < max(10.0, epoch_seconds(study)):
            break
        run_trial(_ask(study, settings), study, overrides, out, kept, settings.recipes, left)
        study.set_user_attr("seconds", time.time() - started)
    board = leaderboard(study)
    _write_leaderboard(board, out / "leaderboard.csv")
    from finetune.train.loggers import log_table

    log_table(
        settings.logger,
        out,
        "leaderboard",
        list(LEADERBOARD_FIELDS),
        [[row[field] for field in LEADERBOARD_FIELDS] for row in board],
    )
    best = next((row for row in board if row["state"] == "COMPLETE" and row["checkpoint"]), None)
    checkpoint = None
    if best is not None:
        checkpoint = out / "best.ckpt"
        if Path(best["checkpoint"]).is_file():
            shutil.copyfile(best["checkpoint"], checkpoint)
        else:  # a shared study's best trial ran on another machine: its checkpoint is there
            checkpoint = Path(best["checkpoint"])
    return AutoResult(checkpoint, best["score"] if best else None, board, out, time.time() - started, settings.budget)


def _open_study(out: Path, settings: AutoSettings):
    """The study in ``out/auto.db``: a new one, or with ``resume`` the one there, its trials cut
    off by a kill told FAIL."""
    import optuna
    from optuna.trial import TrialState

    from finetune.search.storage import open_storage

    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.storage:  # shared: joined if it exists; its RUNNING trials may be other workers'
        return optuna.create_study(
            study_name=settings.study_name,
            storage=open_storage(settings.storage, shared=True, heartbeat=HEARTBEAT),
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=settings.seed),
            pruner=optuna.pruners.HyperbandPruner(min_resource=1),
        )
    storage = f"sqlite:///{out / 'auto.db'}"
    exists = (out / "auto.db").is_file()
    if exists and not settings.resume:
        raise ConfigError(f"{out} already holds an auto search: resume=true to go on with it, or another out=.")
    if settings.resume and not exists:
        raise ConfigError(f"resume=true: {out} holds no auto search (auto.db) to go on with.")
    study = optuna.create_study(
        study_name="auto",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1),
    )
    for trial in study.get_trials(states=(TrialState.RUNNING,)):  # killed while it ran
        study.tell(trial.number, state=TrialState.FAIL)
    return study


def _ask(study, settings: AutoSettings):
    """The next trial; in a shared study the trials of killed workers are failed (and queued again)
    first, and the trial's heartbeat recorded."""
    if not settings.storage:
        return study.ask()
    import warnings

    from finetune.search.storage import fail_dead_trials, worker_name

    fail_dead_trials(study)
    with warnings.catch_warnings():  # heartbeats are "meant for Study.optimize"
        warnings.simplefilter("ignore")
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr("worker", worker_name())
    return trial


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
