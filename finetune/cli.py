"""``finetune`` on the command line: Hydra overrides in, a closing report and an exit code out.

``finetune [OVERRIDES]`` trains (``-m`` for a sweep); ``finetune check-data [OVERRIDES]`` and
``finetune show-groups [OVERRIDES]`` inspect the data and the layer groups without training.
Mistakes a user can fix exit with code 2 and a one-paragraph message.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from finetune.config import config_dir, register_recipes
from finetune.errors import FinetuneError
from finetune.train import run


def _fail(err: Exception) -> None:
    """One paragraph and exit code 2; HYDRA_FULL_ERROR=1 shows the whole traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def _train(cfg: DictConfig) -> float | None:
    if _in_sweep():
        return _sweep_trial(cfg)
    try:
        result = run(cfg)
    except FinetuneError as err:
        _fail(err)
    # Sweepers (Optuna) maximize what the task returns.
    return result.metrics.get("val/acc")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_trial(cfg: DictConfig) -> float:
    """One trial of a sweep: a failure is written to error.txt and scored NaN; the sweep goes on."""
    import traceback
    from pathlib import Path

    from finetune.sweep import ERROR_FILE

    try:
        value = run(cfg).metrics.get("val/acc")
        return float("nan") if value is None else value
    except Exception as err:  # noqa: BLE001 - isolating any trial failure is the point
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        print(f"error: trial failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return float("nan")


def main() -> None:
    """Entry point of the ``finetune`` console script."""
    register_recipes()
    from finetune.commands import COMMANDS

    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        command = COMMANDS[sys.argv[1]]
        try:
            sys.exit(command(sys.argv[2:]))
        except (FinetuneError, HydraException, OmegaConfBaseException) as err:
            _fail(err)
    _check_overrides(sys.argv[1:])
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_train)()


def _check_overrides(args: list[str]) -> None:
    """Compose a plain run's config once before Hydra does, so that an unknown key or a bad
    override exits with code 2 and Hydra's one-paragraph message (Hydra itself exits 1).
    Runs with flags (-m, --cfg, --help, ...) are left to Hydra."""
    if not args or any(a.startswith("-") for a in args):
        return
    from finetune.config import compose_config

    try:
        compose_config(args)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(err)


if __name__ == "__main__":
    main()
