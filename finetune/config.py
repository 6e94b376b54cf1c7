"""Where the Hydra configs and recipes live, and how recipes join the config tree.

From a source checkout they are the top-level ``conf/`` and ``recipes/``; an installed wheel
carries them as ``finetune/conf`` and ``finetune/recipes``. Recipes are registered in Hydra's
ConfigStore as group ``recipe`` (package ``_global_``), so ``+recipe=NAME`` works from any
working directory.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

_PACKAGE = Path(__file__).resolve().parent


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
    register_recipes()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="finetune"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        if str(OmegaConf.to_container(cfg.paths, resolve=False)["output_dir"]).startswith("${hydra:"):
            run_dir = Path(cfg.hydra.run.dir).resolve()
            # resume=true continues the run in that very folder.
            cfg.paths.output_dir = str(run_dir if cfg.get("resume") is True else _unique_dir(run_dir))
        del cfg["hydra"]
    return cfg


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# Values whose type the code relies on, checked before a run starts: a wrong one is a one-line
# ConfigError instead of a traceback from deep inside a library. key -> (types, minimum, wording)
TYPED_KEYS = {
    "seed": ((int,), None, "an integer"),
    "data.batch_size": ((int,), 1, "a positive integer"),
    "data.num_workers": ((int,), 0, "auto or an integer >= 0"),
    "trainer.max_epochs": ((int,), -1, "an integer (-1: no limit)"),
    "optimizer.lr": ((int, float), 0, "a number >= 0"),
    "resume": ((bool,), None, "true or false"),
    "callbacks.checkpoint.min_write_interval_s": ((int, float), 0, "a number of seconds >= 0 (0: every epoch)"),
}


def check_types(cfg: DictConfig) -> None:
    """Raise a ConfigError naming the first key of :data:`TYPED_KEYS` whose value is wrong."""
    from finetune.errors import ConfigError

    for key, (types, minimum, expected) in TYPED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or (key == "data.num_workers" and value == "auto"):
            continue
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong or (minimum is not None and value < minimum):
            raise ConfigError(f"{key}={value!r}: it must be {expected}.")
