"""The CLI's subcommands besides training: each takes ``key=value`` arguments and returns an
exit code. Before training: ``check-data``, ``show-groups`` (:mod:`.inspect_run`), ``lr-find``
(:mod:`.lr_find`); with a trained
model: ``predict``, ``evaluate``, ``export``, ``viz`` (:mod:`.model`); features out: ``embed``,
``probe`` (:mod:`.features`); what to look at in the data: ``audit`` (:mod:`.audit`); data as
streamed shards: ``shard`` (:mod:`.shard`); which backbone suits
it: ``rank`` (:mod:`.rank`), and the whole choice within a budget: ``auto`` (:mod:`.auto`); sharing a model: ``push``
(:mod:`.share`), ``serve`` (:mod:`.serve`). A
command's module is imported when it runs, so that the CLI answers ``--help`` and mistakes
without loading torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# command -> (module, function)
COMMANDS = {
    "check-data": ("finetune.commands.inspect_run", "check_data_command"),
    "show-groups": ("finetune.commands.inspect_run", "show_groups_command"),
    "lr-find": ("finetune.commands.lr_find", "lr_find_command"),
    "predict": ("finetune.commands.model", "predict_command"),
    "evaluate": ("finetune.commands.model", "evaluate_command"),
    "export": ("finetune.commands.model", "export_command"),
    "viz": ("finetune.commands.model", "viz_command"),
    "embed": ("finetune.commands.features", "embed_command"),
    "probe": ("finetune.commands.features", "probe_command"),
    "audit": ("finetune.commands.audit", "audit_command"),
    "shard": ("finetune.commands.shard", "shard_command"),
    "rank": ("finetune.commands.rank", "rank_command"),
    "auto": ("finetune.commands.auto", "auto_command"),
    "push": ("finetune.commands.share", "push_command"),
    "serve": ("finetune.commands.serve", "serve_command"),
}


def command(name: str) -> Callable[[list[str]], int]:
    """The function behind ``finetune NAME``."""
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def __getattr__(name: str):
    for command_name, (_, function) in COMMANDS.items():
        if function == name:
            return command(command_name)
    raise AttributeError(f"module 'finetune.commands' has no attribute {name!r}")
