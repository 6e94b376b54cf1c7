"""``finetune auto``: backbone, recipe and hyperparameters chosen within a time budget (:mod:`finetune.search.auto`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from finetune.commands.args import flag, output_dir, parse
from finetune.tables import format_table

OPTIONS = {
    "time_budget": "10m",
    "resume": "false",
    "out": None,
    "auto.backbones": None,
    "auto.top": "2",
    "auto.recipes": None,
    "auto.folds": "5",
    "storage": None,
    "study_name": None,
}


def auto_command(args: Sequence[str]) -> int:
    """``finetune auto data=... [time_budget=10m] [auto.backbones=[NAME,...]] [auto.top=2]
    [auto.recipes=[RECIPE,...]] [resume=true] [out=DIR]``: rank the backbones on this data's frozen
    features (as ``finetune rank``; default: those with weights here offline), keep the top ones,
    then let Optuna (TPE, Hyperband pruning per epoch) try recipes (default: freeze_all_but_head,
    lp_ft, gradual_unfreeze, discriminative_lr, full_finetune) with factors on each recipe's
    learning rate and weight decay (the first two recipes as shipped first), until the wall-time
    budget is spent (ranking included). Each trial is a run in OUT/trials/N; the best one's
    weights are copied to OUT/best.ckpt (nothing is trained again) and every trial is ranked in
    OUT/leaderboard.csv (and a W&B table when W&B is on). resume=true with the same out= goes on
    with the search, finished trials kept. storage=postgresql://USER:PASSWORD@HOST/DB [study_name=auto]
    keeps the study in a database server that several workers (machines) share. Other key=value
    arguments are config overrides for every trial (data=..., trainer.max_epochs=...)."""
    result = run_auto(args)
    print(f"auto: {result.summary()}; leaderboard, best first:")
    print(format_table(*result.table()))
    if result.checkpoint is None:
        print(f"no trial finished within the budget; the trials' logs are in {result.folder / 'trials'}")
    else:
        print(f"best: {result.score:.4f} -> {result.checkpoint}")
    print(f"  leaderboard: {result.folder / 'leaderboard.csv'}")
    return 0 if result.checkpoint is not None else 1


def run_auto(args: Sequence[str]):
    """:func:`auto_command`'s search and report; the :class:`~finetune.search.auto.AutoResult`."""
    from finetune.search.auto import auto_settings, parse_budget, search
    from finetune.search.rank import rank_backbones

    opts, overrides = parse(args, OPTIONS, "auto", "all")
    budget = parse_budget(opts["time_budget"])
    settings, cfg = auto_settings(opts, overrides, budget, flag(opts, "resume"))
    out = output_dir(opts["out"])

    def rank(candidates):
        ranking = rank_backbones(candidates, cfg, overrides, settings.folds)
        print("\n".join(ranking.lines()))
        return [asdict(r) for r in ranking.ranked]

    return search(overrides, out, settings, rank)
