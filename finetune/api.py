"""The notebook's entry points: ``fit(recipe, overrides, **options)``, ``check_data(...)`` and
``audit(...)``; each is the CLI command of the same name, and returns what it found as an object
a notebook renders (``_repr_html_``)."""

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
    args = ([f"+recipe={recipe}"] if recipe and recipe != "auto" else []) + _args(overrides, {})
    if recipe == "auto":  # ``finetune auto``'s own options (time_budget=, auto.top=, out=, resume=) are taken as given
        from finetune.commands.auto import OPTIONS, run_auto

        return run_auto(_args(args, options, OPTIONS))
    return run(compose_config(_args(args, options)))


def _args(overrides: Sequence[str] | str, options: dict, own: Sequence[str] = ()) -> list[str]:
    """Command-line arguments: `overrides` as given, `options` with ``__`` for dots; keys in `own`
    (a command's own options, not config keys) pass through as plain strings."""
    args = [overrides] if isinstance(overrides, str) else list(overrides)
    for key, value in options.items():
        key = key.replace("__", ".")
        args.append(f"{key}={value if key in own else hydra_value(value)}")
    return args


def check_data(overrides: Sequence[str] = (), **options):
    """``finetune check-data``: the data check with a full decode of every file, as a
    :class:`~finetune.data.check.DataReport` (``.table()`` for text): images per class and split,
    image sizes, skipped files and why, duplicates, warnings.
    ``check_data(data="folder", data__root="/photos")``."""
    from finetune.commands.inspect_run import full_check

    return full_check(_args(overrides, options))


def audit(overrides: Sequence[str] = (), **options):
    """``finetune audit``: likely label errors, near-duplicates, outliers and the k-fold accuracy
    of a linear probe on the pretrained features, as an :class:`~finetune.viz.audit.AuditReport`
    (``show_suspects()``, ``show_duplicates()``, ``rows()``). Its own options: ``folds=5``,
    ``top=24``, ``similarity=0.95``, ``out=DIR`` (where its files go); the rest are config keys.
    ``audit(data="folder", data__root="/photos", folds=5)``."""
    from finetune.commands.audit import OPTIONS, run_audit

    return run_audit(_args(overrides, options, OPTIONS))
