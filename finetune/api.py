"""The notebook entry point: ``fit(recipe, overrides, **options)``."""

from __future__ import annotations

from collections.abc import Sequence

from finetune.config import compose_config, hydra_value
from finetune.train.run import FitResult, run


def fit(recipe: str | None = None, overrides: Sequence[str] = (), **options) -> FitResult:
    """Fine-tune as the CLI would: ``finetune +recipe=RECIPE OVERRIDES...``.

    `overrides` are Hydra override strings (``"data=folder"``, ``"optimizer.lr=0.01"``).
    `options` are the same as keywords, with ``__`` for dots:
    ``fit("freeze_all_but_head", data="folder", data__root="/photos", trainer__max_epochs=5)``.
    Returns a :class:`FitResult`; Hydra's global state is left as it was found.
    ``fit("auto", overrides, time_budget="10m")`` runs ``finetune auto`` instead and returns its
    :class:`~finetune.search.auto.AutoResult` (the best checkpoint, the leaderboard).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    args = ([f"+recipe={recipe}"] if recipe and recipe != "auto" else []) + list(overrides)
    if recipe == "auto":  # ``finetune auto``'s own options (time_budget=, auto.top=, out=, resume=) are taken as given
        from finetune.commands.auto import OPTIONS, run_auto

        given = {key.replace("__", "."): value for key, value in options.items()}
        return run_auto(args + [f"{k}={v if k in OPTIONS else hydra_value(v)}" for k, v in given.items()])
    args += [f"{key.replace('__', '.')}={hydra_value(value)}" for key, value in options.items()]
    return run(compose_config(args))
