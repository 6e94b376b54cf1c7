"""Where the Hydra configs and recipes live, and how recipes join the config tree.

From a source checkout they are the top-level ``conf/`` and ``recipes/``; an installed wheel
carries them as ``finetune/conf`` and ``finetune/recipes``. Recipes are registered in Hydra's
ConfigStore as group ``recipe`` (package ``_global_``), so ``+recipe=NAME`` works from any
working directory.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
_PLAIN = re.compile(r"[\w./\-:~+@%]+")


def _first_dir(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"finetune's {name}/ folder is missing next to {_PACKAGE}; reinstall finetune.")


def config_dir() -> Path:
    return _first_dir("conf")


def recipes_dir() -> Path:
    return _first_dir("recipes")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


_registered: dict[Path, int] = {}  # recipe file -> the mtime it was registered with


def register_recipes() -> None:
    """Put every ``recipes/*.yaml`` into the ConfigStore as ``recipe/NAME`` (idempotent; a file
    is parsed again only when it changed)."""
    store = ConfigStore.instance()
    for path in sorted(recipes_dir().glob("*.yaml")):
        mtime = path.stat().st_mtime_ns
        if _registered.get(path) != mtime:
            store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
            _registered[path] = mtime


def compose_config(overrides: list[str]) -> DictConfig:
    """The run config Hydra's CLI would build for `overrides`, without touching global state.

    ``paths.output_dir`` (which the CLI takes from Hydra's run directory) becomes the resolved
    ``hydra.run.dir``, made unique so that two runs in the same second never share a folder
    (except with ``resume=true``, which continues the run found there).
    """
    from hydra.core.global_hydra import GlobalHydra

    register_recipes()
    # Inside a Hydra app (a sweep's end, ``finetune viz`` from a callback) Hydra is initialized:
    # compose beside it, then put it back as it was.
    global_hydra = GlobalHydra.instance()
    outer, global_hydra.hydra = global_hydra.hydra, None
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="finetune"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    finally:
        global_hydra.hydra = outer
    with open_dict(cfg):
        if str(OmegaConf.to_container(cfg.paths, resolve=False)["output_dir"]).startswith("${hydra:"):
            run_dir = Path(cfg.hydra.run.dir).resolve()
            # resume=true continues the run in that very folder; overwrite=true replaces it.
            reuse = cfg.get("resume") is True or cfg.get("overwrite") is True
            cfg.paths.output_dir = str(run_dir if reuse else _unique_dir(run_dir))
        del cfg["hydra"]
    return cfg


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# Values whose type the code relies on, checked before a run starts: a wrong one is a one-line
# ConfigError instead of a traceback from deep inside a library (or a run that means nothing).
# key -> (types, minimum, wording); see also _VALUE_RULES in check_values.
TYPED_KEYS = {
    "seed": ((int,), 0, "an integer from 0 to 2**32 - 1"),
    "data.batch_size": ((int,), 1, "a positive integer"),
    "data.num_workers": ((int,), 0, "auto or an integer >= 0"),
    "data.image_size": ((int,), 16, "null (the backbone's size) or an integer of at least 16 (pixels)"),
    "trainer.max_epochs": ((int,), -1, "a positive integer (-1: no limit, with callbacks.early_stopping_patience)"),
    "optimizer.lr": ((int, float), 0, "a number >= 0, or auto (the lr finder chooses)"),
    "head.dropout": ((int, float), 0, "a probability from 0 up to (not including) 1"),
    "resume": ((bool,), None, "true or false"),
    "callbacks.checkpoint.min_write_interval_s": ((int, float), 0, "a number of seconds >= 0 (0: every epoch)"),
}
# Lightning's precision names (plus auto, resolved per machine by finetune.compute.speed).
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
    64,
    32,
    16,
)


def check_types(cfg: DictConfig) -> None:
    """Raise a ConfigError naming the first key of :data:`TYPED_KEYS` whose value is wrong, then
    apply :func:`check_values`."""
    for key, (types, minimum, expected) in TYPED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or (key in ("data.num_workers", "optimizer.lr") and value == "auto"):
            continue
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong or (minimum is not None and value < minimum):
            raise ConfigError(f"{key}={value!r}: it must be {expected}.")
    check_values(cfg)


# The choices of tta, augment.policy, task (this module imports no room; tests check they match theirs).
TTA_CHOICES, TASK_CHOICES = ("none", "flip", "crops", "crops_flip"), ("multiclass", "multilabel")
POLICY_CHOICES = ("none", "randaugment", "trivialaugment", "autoaugment")


def _not_fraction(value) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1)


def _negative(value) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0)


def check_values(cfg: DictConfig) -> None:
    """Values of the right type that make no sense, refused with the fix (one rule per line):
    seed beyond 2**32 - 1; head.dropout >= 1 (every feature dropped); trainer.max_epochs=0 (no
    model) or -1 without callbacks.early_stopping_patience, trainer.max_steps or max_time (never
    stops); a trainer.precision Lightning does not know; task; the training techniques' values
    (tta, augment.policy, label smoothing, EMA decay, drop-path rate, mixup/cutmix alphas, warm-up)."""
    get = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    rules = [
        ("seed", lambda v: v is not None and v > 2**32 - 1, "it must be an integer from 0 to 2**32 - 1"),
        (
            "head.dropout",
            lambda v: v is not None and v >= 1,
            "a dropout of 1 or more drops every feature; use a probability below 1 (0.0: none)",
        ),
        ("trainer.max_epochs", lambda v: v == 0, "0 epochs trains nothing and writes no model; use 1 or more"),
        (
            "trainer.max_epochs",
            lambda v: (
                v == -1
                and not get("callbacks.early_stopping_patience")
                and get("trainer.max_steps") in (None, -1)
                and get("trainer.max_time") is None
            ),
            "-1 (no limit) never stops by itself; set callbacks.early_stopping_patience=N "
            "(or +trainer.max_time=...), or give a number of epochs",
        ),
        (
            "trainer.precision",
            lambda v: v is not None and v not in PRECISIONS,
            f"choose one of {', '.join(str(p) for p in PRECISIONS[:6])} (Lightning's precision names)",
        ),
        ("tta", lambda v: v is not None and v not in TTA_CHOICES, f"choose {', '.join(TTA_CHOICES)}"),
        ("task", lambda v: v is not None and v not in TASK_CHOICES, "choose multiclass or multilabel"),
        ("multilabel.thresholds", lambda v: v not in (None, "f1", "accuracy", "none"), "choose f1, accuracy or none"),
        ("multilabel.label_count", lambda v: v not in (None, "auto", "any"), "choose auto or any"),
        ("trust.calibration_fraction", _not_fraction, "a share of the training images from 0 up to (not including) 1"),
        ("trust.conformal", lambda v: v not in (None, "lac", "aps"), "choose lac or aps"),
        ("augment.policy", lambda v: v is not None and v not in POLICY_CHOICES, f"choose {', '.join(POLICY_CHOICES)}"),
        ("loss.label_smoothing", _not_fraction, "a number from 0 up to (not including) 1 (0.1 is usual)"),
        ("ema.decay", _not_fraction, "a number from 0 (off) up to (not including) 1; 0.99 averages about 100 steps"),
        ("backbone.drop_path_rate", _not_fraction, "a rate from 0 up to (not including) 1 (0.1 is usual), or null"),
        ("mixup.alpha", _negative, "a Beta-distribution alpha >= 0 (0: off; 0.2 to 0.8 are usual)"),
        ("cutmix.alpha", _negative, "a Beta-distribution alpha >= 0 (0: off; 1.0 is usual)"),
        ("scheduler.warmup_epochs", _negative, "a number of epochs >= 0"),
    ]
    for key, broken, fix in rules:
        if broken(get(key)):
            raise ConfigError(f"{key}={get(key)!r}: {fix}.")


def hydra_value(value) -> str:
    """A Python value written in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value) if not isinstance(value, Path) else str(value.expanduser())
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unknown_option(group: str, option: str) -> str:
    folder = config_dir() / group
    options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")) if folder.is_dir() else []
    if group == "recipe":
        options = recipe_names()
    close = difflib.get_close_matches(option, options, n=1)
    plus = "+" if group in ("recipe", "hparams_search") else ""
    hint = f" Did you mean {plus}{group}={close[0]}?" if close else ""
    listed = f" Options: {', '.join(options)}." if options else ""
    if group == "backbone":
        listed += " Any timm model: backbone.name=NAME (finetune list backbones)."
    return f"No {group} named {option!r}.{hint}{listed}"


@cache
def _group_file(group: str, option: str) -> dict:
    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(unknown_option(group, option))
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)
    return values


def with_defaults(group: str, option: str, values: Mapping) -> dict:
    """`values` (a config group's node, possibly partial, as a caller of a library function
    passes it) completed from ``conf/GROUP/OPTION.yaml``: the YAML is the one place a default lives."""
    plain = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
    return {**_group_file(group, option), **plain}
