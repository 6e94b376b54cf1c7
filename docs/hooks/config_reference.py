"""MkDocs hook: the config reference page, generated from ``conf/`` and ``recipes/`` at every build.

The page lists every config group (each option file, its keys with their default values and the
YAML comments beside them) and every recipe (its header comment and its overrides), so it cannot
drift from the files. The YAML is read as text (the comments are the documentation) and as YAML
(for block lists); finetune itself is not imported. ``config_reference()`` is plain Python, so a
test can call it; ``on_files`` is the MkDocs event that adds the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

PAGE = "reference/config.md"
ROOT = Path(__file__).resolve().parents[2]

KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.\-/@ ]*?|'[^']*'|\"[^\"]*\"):(?:\s+(?P<value>.*))?$")


def _split_comment(value: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment), ignoring ``#`` inside quotes and ``${...}``."""
    quote, depth = "", 0
    for i, ch in enumerate(value):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or value[i - 1].isspace()):
            return value[:i].rstrip(), value[i + 1 :].strip()
    return value.rstrip(), ""


def _flow(value) -> str:
    """A YAML value on one line, as a reader would type it."""
    if isinstance(value, str):
        first, _, rest = value.strip().partition("\n")
        return first + (" …" if rest else "")
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...")


def _lookup(data, path: list[str]):
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def parse(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(header comment, [(dotted key, default as written, comment)]) of one YAML file.

    The header is the comment block that opens the file (``# @package`` lines left out); a
    key's comment is the comment block right above it plus its inline comment. A mapping is a
    row of its own (its value left empty) followed by its keys."""
    lines = text.splitlines()
    loaded = yaml.safe_load(text) or {}
    header, i = [], 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        line = lines[i].strip().lstrip("#").strip()
        if not line.startswith("@package"):
            header.append(line)
        i += 1
    rows, stack, pending, block_indent = [], [], [], None
    for line in lines[i:]:
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue  # inside a block scalar (| or >)
            block_indent = None
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if stripped.startswith("- ") or not match:
            pending = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"].strip("'\"")
        path = [k for _, k in stack] + [key]
        value, inline = _split_comment(match["value"] or "")
        comment = " ".join(pending + ([inline] if inline else []))
        pending = []
        if value in ("|", ">", "|-", ">-"):
            block_indent = indent
            value = _flow(_lookup(loaded, path))
        elif not value:
            child = _lookup(loaded, path)
            value = "" if isinstance(child, dict) else _flow(child)
            stack.append((indent, key))
        rows.append((".".join(path), value, comment))
    return " ".join(header), rows


def _cell(text: str, code: bool = False) -> str:
    """Text for a table cell: pipes escaped; outside code also what markdown would read as HTML or emphasis."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if code else _prose(text)


def _prose(text: str) -> str:
    return text.replace("<", "&lt;").replace("*", "\\*")


def _table(rows: list[tuple[str, str, str]], prefix: str = "") -> str:
    if not rows:
        return "No keys."
    out = ["| key | default | comment |", "|---|---|---|"]
    for key, value, comment in rows:
        shown = f"`{_cell(value, code=True)}`" if value else ""
        full = key if key == "defaults" else prefix + key
        out.append(f"| `{_cell(full, code=True)}` | {shown} | {_cell(comment)} |")
    return "\n".join(out)


def config_reference(conf_dir: Path, recipes_dir: Path) -> str:
    """The markdown of the config reference page for the YAML files under conf_dir and recipes_dir."""
    conf_dir, recipes_dir = Path(conf_dir), Path(recipes_dir)
    out = [
        "# Config reference",
        "",
        "Generated at every docs build from `conf/` and `recipes/` by `docs/hooks/config_reference.py`: "
        "every key with its default value as the YAML file writes it, and the comment beside it. "
        "Choose a group's option with `GROUP=OPTION` (`data=folder`), set any key with `key=value` "
        "(`optimizer.lr=0.03`), add a recipe with `+recipe=NAME`. The guide to them: "
        "[Configs, recipes and freezing](../guide/recipes-and-freezing.md).",
    ]
    root = conf_dir / "config.yaml"
    defaults = {}
    if root.exists():
        header, rows = parse(root.read_text())
        defaults = {
            k: v
            for item in (yaml.safe_load(root.read_text()) or {}).get("defaults", [])
            if isinstance(item, dict)
            for k, v in item.items()
        }
        out += ["", "## The root config: `conf/config.yaml`", "", _prose(header), "", _table(rows)]
    out += ["", "## Config groups"]
    groups: dict[str, list[Path]] = {}
    for path in sorted(conf_dir.rglob("*.yaml")):
        if path != root:
            groups.setdefault(path.parent.relative_to(conf_dir).as_posix(), []).append(path)
    for group, paths in sorted(groups.items()):
        default = defaults.get(group)
        options = ", ".join(f"`{p.stem}`" for p in paths if not p.stem.startswith("_"))
        out += ["", f"### `{group}/`", "", f"Options: {options}." + (f" Default: `{default}`." if default else "")]
        prefix = group.replace("/", ".") + "."
        for path in paths:
            header, rows = parse(path.read_text())
            package_global = re.search(r"^#\s*@package\s+_global_", path.read_text(), re.M) is not None
            title = f"`{group}/{path.stem}`" if path.stem.startswith("_") else f"`{group}={path.stem}`"
            note = " (a building block other options of the group include)" if path.stem.startswith("_") else ""
            out += ["", f"#### {title}{note}", ""]
            if header:
                out += [_prose(header), ""]
            out.append(_table(rows, "" if package_global else prefix))
    out += ["", "## Recipes", "", "Each recipe is a short file of overrides: `+recipe=NAME`."]
    for path in sorted(recipes_dir.glob("*.yaml")):
        header, rows = parse(path.read_text())
        out += ["", f"### `+recipe={path.stem}`", ""]
        if header:
            out += [_prose(header), ""]
        out.append(_table(rows))
    return "\n".join(out) + "\n"


def on_files(files, config):
    """Add the generated page to the build (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    content = config_reference(ROOT / "conf", ROOT / "recipes")
    files.append(File.generated(config, PAGE, content=content))
    return files
