"""``finetune`` on the command line: Hydra overrides in, a closing report and an exit code out."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from finetune.config import config_dir, register_recipes
from finetune.errors import FinetuneError
from finetune.train import run

log = logging.getLogger("finetune")


def _train(cfg: DictConfig) -> float | None:
    try:
        result = run(cfg)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Sweepers (Optuna) maximize what the task returns.
    return result.metrics.get("val/acc")


def main() -> None:
    """Entry point of the ``finetune`` console script."""
    register_recipes()
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_train)()


if __name__ == "__main__":
    main()
