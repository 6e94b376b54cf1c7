"""What every subcommand shares: its one argument parser, the output folder, and images decoded
batch by batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from finetune.config import compose_config
from finetune.data.images import UnreadableImage, load_rgb
from finetune.errors import ConfigError

REQUIRED = object()  # an option without a default: the command needs it
# abstain and prediction sets (finetune.use.confidence), for predict, evaluate and export
TRUST_OPTIONS = {"min_confidence": None, "target_precision": None, "coverage": None, "conformal": None}


def parse(args: Sequence[str], options: dict, command: str, overrides: str | None = None) -> tuple[dict, list[str]]:
    """(this command's ``key=value`` options, the config overrides among `args`).

    `options` maps each option to its default (:data:`REQUIRED`: must be given; None: optional).
    ``hydra.run.dir=DIR`` means ``out=DIR``, as for training. `overrides`: which other
    ``key=value`` arguments the command passes on to the config: None (none), ``"data"``
    (``data=...`` and ``data.*=...``) or ``"all"``. Anything else is a :class:`ConfigError`
    that lists what the command takes.
    """
    chosen, passed_on = dict(options), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "hydra.run.dir" and "out" in options:
            key = "out"
        if sep and key in options:
            chosen[key] = value
        elif sep and (overrides == "all" or (overrides == "data" and (key == "data" or key.startswith("data.")))):
            passed_on.append(arg)
        else:
            accepted = " ".join(f"{k}=..." for k in options)
            accepted += {None: "", "data": " data=... data.*=...", "all": " and config overrides (key=value)"}[
                overrides
            ]
            raise ConfigError(f"finetune {command}: unexpected argument {arg!r}; it takes {accepted}.")
    missing = [k for k, v in chosen.items() if v is REQUIRED]
    if missing:
        raise ConfigError(f"finetune {command} needs {' '.join(f'{k}=...' for k in missing)}.")
    return chosen, passed_on


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(opts: dict, key: str) -> bool:
    """The option `key` as a bool (true/yes/1, false/no/0), or a ConfigError naming it."""
    value = _BOOLEANS.get(str(opts[key]).lower())
    if value is None:
        raise ConfigError(f"{key}={opts[key]!r}: true or false.")
    return value


def decision_rule_from(opts: dict, model):
    """`model`'s decision rule for the :data:`TRUST_OPTIONS` among `opts` (strings as parsed)."""
    numbers = {}
    for key in ("min_confidence", "target_precision", "coverage"):
        value = opts.get(key)
        try:
            numbers[key] = None if value in (None, "", "null") else float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: a number between 0 and 1.") from None
    return model.decision_rule(**numbers, score=opts.get("conformal"))


def output_dir(out: str | None) -> Path:
    """`out` (or ``hydra.run.dir=``), else a fresh run directory like training's: outputs/DATE/TIME."""
    path = Path(out) if out else Path(compose_config([]).paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def readable_batches(samples: Sequence, size: int, failures: dict[str, str]) -> Iterator[tuple[list, list, list]]:
    """Batches ``(images, names, labels)`` of `samples` ((path or array, label) pairs), decoded as
    they are needed so memory holds one batch; unreadable files go to `failures` (path -> reason)."""
    images, names, labels = [], [], []
    for item, label in tqdm(samples, desc="decoding", unit="img", disable=True if len(samples) < 50 else None):
        if isinstance(item, str):
            try:
                image = load_rgb(item)
            except UnreadableImage as err:
                failures[item] = str(err)
                continue
        else:
            image = item
        images.append(image)
        names.append(item if isinstance(item, str) else type(item).__name__)
        labels.append(label)
        if len(images) == size:
            yield images, names, labels
            images, names, labels = [], [], []
    if images:
        yield images, names, labels
