"""``finetune`` on the command line: dispatch only. ``finetune [OVERRIDES]`` trains (``-m`` for a
sweep) through Hydra with :mod:`finetune.commands.train`'s job; ``finetune NAME ARGS`` runs a
subcommand of :mod:`finetune.commands` (``check-data``, ``predict``, ``auto``, ...), ``help`` or
``list``. Mistakes a user can fix exit with code 2 and a one-paragraph message.
"""

from __future__ import annotations

import re
import sys

import hydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from finetune.commands.train import check_command_line, fail, train_job
from finetune.config import config_dir, register_recipes
from finetune.errors import ConfigError, FinetuneError
from finetune.search.sweep import register_resolvers
from finetune.train.distributed import child_argv

# A first argument that can only be a command (overrides have `=`, flags `-`, appends `+`).
_COMMAND_LIKE = re.compile(r"[A-Za-z][\w-]*")


def main() -> None:
    """Entry point of the ``finetune`` console script."""
    register_recipes()
    register_resolvers()
    sys.argv = child_argv(sys.argv)  # a DDP process of rank > 0 runs its parent's job
    args = sys.argv[1:]
    if args and _COMMAND_LIKE.fullmatch(args[0]):
        try:
            sys.exit(_command(args[0], args[1:]))
        except (FinetuneError, HydraException, OmegaConfBaseException) as err:
            fail(err)
    check_command_line(args)
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train_job)()


def _command(name: str, args: list[str]) -> int:
    """Run ``finetune NAME ARGS``: a subcommand, ``help``, ``list``, or an unknown word."""
    from finetune.commands import COMMANDS, command
    from finetune.commands.help import command_help, help_command, list_command, unknown_command

    if name == "help":
        return help_command(args)
    if name == "list":
        return list_command(args)
    if name not in COMMANDS:
        raise ConfigError(unknown_command(name))
    if any(a in ("-h", "--help") for a in args):
        print(command_help(name))
        return 0
    return command(name)(args)


if __name__ == "__main__":
    main()
