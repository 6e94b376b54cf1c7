"""The command line's pre-flight: a command line Hydra would refuse, refused first with the fix.

An unknown key gets "did you mean" from the composed config, an unknown group option the
closest option, a ``+GROUP.KEY`` that nothing reads the closest key that is read, a sweeper or
launcher whose extra is missing its ``pip install``. :func:`check_overrides` is what
``finetune [OVERRIDES]`` runs before handing the command line to Hydra (:mod:`finetune.cli`).
"""

from __future__ import annotations

import difflib
import re
from functools import cache

from omegaconf import DictConfig, OmegaConf

from finetune.config import compose_config, config_dir, recipes_dir, unknown_option
from finetune.errors import ConfigError

# Hydra's command-line flags that take a value (`--cfg job`); the others (-m) stand alone.
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}
# What a sweep override's value looks like: a top-level comma, or Hydra's sweep functions (int(...) too).
_SWEEP_VALUE = re.compile(
    r"^((int|float|str|bool)\(\s*)*(range|choice|interval|glob|tag|shuffle)\(|,(?![^\[\]{}()]*[\]})])"
)
# Config groups whose options come from an extra: option prefix -> (module, pip extra).
_EXTRAS = {
    "hparams_search=optuna": ("optuna", "sweep"),
    "hydra/sweeper=optuna": ("optuna", "sweep"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "data=hf": ("datasets", "hf"),
    "data=stream": ("litdata", "stream"),
    "logger=mlflow": ("mlflow", "loggers"),
    "logger=tensorboard": ("tensorboard", "loggers"),
}


def check_overrides(args: list[str]) -> DictConfig | None:
    """Raise a ConfigError for a command line Hydra would refuse, with the fix: an unknown key
    gets "did you mean" from the composed config, a sweeper or launcher whose extra is missing
    gets its ``pip install``. Sweep values (``a=1,2``, ``range(...)``) are checked by key, so a
    typo under ``-m`` is caught before the sweep starts. Help flags are left to Hydra (None);
    otherwise the composed config (sweep values left out) is returned."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, it = [], iter(args)
    for arg in it:
        if arg in ("--help", "-h", "--hydra-help", "--shell-completion", "-sc"):
            return
        if arg in _FLAGS_WITH_VALUE:
            next(it, None)
        elif not arg.startswith("-"):
            overrides.append(arg)
    for arg in overrides:
        for prefix, (module, extra) in _EXTRAS.items():
            if arg.lstrip("+").startswith(prefix) and not _installed(module):
                raise ConfigError(f"{arg} needs finetune's {extra!r} extra: pip install 'finetune[{extra}]'.")
        if arg.lstrip("+").startswith("hydra.sweeper.storage="):
            _check_storage(arg.partition("=")[2])
    plain = [a for a in overrides if not _SWEEP_VALUE.search(a.partition("=")[2])]
    swept = [a.partition("=")[0] for a in overrides if a not in plain]
    try:
        cfg = compose_config(plain)
    except (HydraException, OmegaConfBaseException) as err:
        key = re.match(r"Could not override '([^']+)'", str(err))
        option = re.search(r"Could not find '([\w/]+)/([^']+)'", str(err))
        if option is not None:
            raise ConfigError(unknown_option(*option.groups())) from None
        if key is None:
            raise ConfigError(" ".join(str(err).split()) or type(err).__name__) from None
        others = [a for a in plain if a.lstrip("+~").partition("=")[0] != key.group(1)]
        raise ConfigError(_unknown_key(key.group(1), compose_config(others))) from None
    for arg in overrides:
        _check_added_key(arg)
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    for key in swept:
        bare = key.lstrip("+~")
        if key.startswith(("+", "~")) or bare.startswith("hydra") or bare in groups:
            continue
        if OmegaConf.select(cfg, bare, default=_MISSING) is _MISSING:
            raise ConfigError(_unknown_key(bare, cfg))
    return cfg


_MISSING = object()


def _check_added_key(arg: str) -> None:
    """``+GROUP.KEY=V`` under one of finetune's own nodes (optimizer, data, trainer...) adds a key
    that nothing reads unless some config or recipe file has it, or it is a Lightning Trainer
    argument (``+trainer.gradient_clip_val=1.0``): anything else is a typo, refused with the
    closest key that is read."""
    key = arg.lstrip("+").partition("=")[0]
    top = key.partition(".")[0]
    ours = {k.partition(".")[0] for k in _read_keys()}
    if not arg.startswith("+") or "." not in key or top in ("hydra", "paths") or top not in ours:
        return
    if key in _read_keys() or (top == "trainer" and key.split(".")[1] in _trainer_arguments()):
        return
    close = difflib.get_close_matches(key, [k for k in _read_keys() if k.startswith(top + ".")], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (finetune --cfg job lists the {top}.* keys)."
    raise ConfigError(f"{key} is not a setting finetune reads{hint}")


@cache
def _read_keys() -> frozenset[str]:
    """Every dotted key that a file of conf/ (hydra/ aside) or recipes/ sets."""
    keys = set()
    files = [(p, p.parent.name) for p in config_dir().glob("*/*.yaml") if p.parent.name != "hydra"]
    files += [(p, "") for p in [config_dir() / "config.yaml", *recipes_dir().glob("*.yaml")]]
    for path, group in files:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        node.pop("defaults", None)
        glob_ = not group or path.read_text().lstrip().startswith("# @package _global_")
        keys.update(_dotted_keys(node if glob_ else {group: node}))
    return frozenset(keys)


@cache
def _trainer_arguments() -> frozenset[str]:
    import inspect

    from lightning import Trainer

    return frozenset(inspect.signature(Trainer.__init__).parameters)


def _check_storage(url: str) -> None:
    """A study's database server that is down, unreachable or refuses the credentials: one line
    before the sweep starts (SQLite files and in-memory studies need no check)."""
    if url.strip("'\"") in ("", "null") or url.startswith(("sqlite:", "${")):
        return
    from finetune.search.storage import open_storage

    open_storage(url.strip("'\"")).engine.dispose()


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _unknown_key(key: str, cfg: DictConfig) -> str:
    keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return (
        f"Unknown config key {key!r}.{hint} (To add a new key on purpose: +{key}=VALUE; "
        f"finetune --cfg job prints every key.)"
    )


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = [prefix] if prefix else []
    if not isinstance(node, dict):
        return keys
    for k, v in node.items():
        keys += _dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys
