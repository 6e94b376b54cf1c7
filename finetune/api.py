"""The notebook entry point: ``fit(recipe, overrides, **options)``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from finetune.config import compose_config
from finetune.train import FitResult, run

_PLAIN = re.compile(r"[\w./\-:~+@%]+")


def fit(recipe: str | None = None, overrides: Sequence[str] = (), **options) -> FitResult:
    """Fine-tune as the CLI would: ``finetune +recipe=RECIPE OVERRIDES...``.

    `overrides` are Hydra override strings (``"data=folder"``, ``"optimizer.lr=0.01"``).
    `options` are the same as keywords, with ``__`` for dots:
    ``fit("freeze_all_but_head", data="folder", data__root="/photos", trainer__max_epochs=5)``.
    Returns a :class:`FitResult`; Hydra's global state is left as it was found.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    args = ([f"+recipe={recipe}"] if recipe else []) + list(overrides)
    args += [f"{key.replace('__', '.')}={_hydra_value(value)}" for key, value in options.items()]
    return run(compose_config(args))


def _hydra_value(value) -> str:
    """A Python value written in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    text = str(value) if not isinstance(value, Path) else str(value.expanduser())
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
