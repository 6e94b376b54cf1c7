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
    try:
        result = run(cfg)
    except FinetuneError as err:
        _fail(err)
    # Sweepers (Optuna) maximize what the task returns.
    return result.metrics.get("val/acc")


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
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_train)()


if __name__ == "__main__":
    main()
