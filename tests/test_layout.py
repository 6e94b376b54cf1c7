"""The package's shape: rooms by purpose, imports that only point down, no cycle, small modules,
every module on the module map of docs/development.md, and nothing installed into a notebook by
``import finetune``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
DEVELOPMENT = PACKAGE.parent / "docs" / "development.md"
MAX_LINES = 350

# room -> rooms it may import (besides itself and the foundations). One training run is
# ``train``; many runs (sweeps, the Optuna sweeper, ranking, auto) are ``search``, a floor above it.
# The top floor, ``commands`` and the top-level modules that are not foundations (api, cli,
# __main__), may import every room; no room imports them.
FOUNDATIONS = {"errors", "config", "console", "files", "tables"}
MAY_IMPORT = {
    "model": set(),
    "data": set(),
    "compute": {"model", "data"},
    "use": {"model", "data", "compute"},
    "viz": {"model", "data", "use"},
    "train": {"model", "data", "compute", "use", "viz"},
    "search": {"model", "data", "compute", "use", "viz", "train"},
    "serve": {"model", "data", "use"},
}
ROOMS = set(MAY_IMPORT)
MAY_IMPORT |= {"commands": ROOMS, "api": ROOMS | {"commands"}, "cli": ROOMS | {"commands"}, "__main__": {"cli"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every finetune module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from finetune.x import y` may be a module
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_rooms_import_only_rooms_below_them():
    upward = []
    for name, targets in GRAPH.items():
        here = room(name)
        if here not in MAY_IMPORT:
            continue
        for target in targets:
            there = room(target)
            if there and there != here and there not in FOUNDATIONS and there not in MAY_IMPORT[here]:
                upward.append(f"{name} -> {target}")
    assert upward == [], "imports that point up or sideways:\n" + "\n".join(upward)


def test_every_module_has_a_floor():
    """A new room or top-level module needs its line in MAY_IMPORT, or its imports go unchecked."""
    assert sorted({room(n) for n in MODULES} - set(MAY_IMPORT) - FOUNDATIONS - {""}) == []


def test_search_sits_above_train_and_the_top_floor_above_every_room():
    """Many runs (search) build on one run (train), never the other way; commands, api and cli
    call every room and no room calls them."""
    assert "train" in MAY_IMPORT["search"] and "search" not in MAY_IMPORT["train"]
    assert [f"{n} -> {t}" for n, ts in GRAPH.items() if room(n) == "train" for t in ts if room(t) == "search"] == []
    top = {"commands", "api", "cli", "__main__"}
    assert all(MAY_IMPORT["commands"] >= MAY_IMPORT[r] | {r} for r in ROOMS)
    assert not any(top & MAY_IMPORT[r] for r in ROOMS)
    assert "finetune.search.auto" in GRAPH["finetune.commands.auto"]


def test_foundations_import_no_room():
    wrong = [
        f"{n} -> {t}"
        for n, ts in GRAPH.items()
        if room(n) in FOUNDATIONS
        for t in ts
        if room(t) not in FOUNDATIONS and room(t)
    ]
    assert wrong == []


def test_no_import_cycle():
    # Package __init__ modules re-export their children: an edge parent -> child is not a cycle.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in GRAPH.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The two tests above can fail: on a made-up graph they report what they should."""
    assert room("finetune.model.freeze") == "model" and "train" not in MAY_IMPORT["model"]
    assert "finetune.train.run" in GRAPH["finetune.api"]
    assert "finetune.model.classifier" in GRAPH["finetune.model.freeze"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (limit {MAX_LINES})"


def development_map() -> set[str]:
    """Module paths (relative to finetune/) named in the development map of docs/development.md: a
    line of ``room/`` opens a room, the deeper-indented lines below it name its modules."""
    text = DEVELOPMENT.read_text()
    block = text[text.index("# Development") :].split("```")[1]
    listed, room_name = set(), ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent == 0 and not line.startswith("finetune/"):
            break  # tests/, benchmarks/: past the package
        names = [w.strip(",") for w in line.split()[:3] if w.strip(",").endswith((".py", "/"))]
        if indent <= 2:
            room_name = names[0] if names and names[0].endswith("/") else ""
            listed |= {n for n in names if n.endswith(".py")}
        else:
            listed |= {room_name + n for n in names if n.endswith(".py")}
    return listed


def test_development_map_lists_every_module():
    modules = {str(p.relative_to(PACKAGE)) for p in MODULES.values() if p.name not in ("__init__.py", "__main__.py")}
    listed = development_map()
    assert sorted(modules - listed) == [], "docs/development.md's module map misses these modules"
    assert sorted(listed - modules) == [], "docs/development.md's module map lists modules that do not exist"


def test_import_finetune_installs_no_warning_filter_or_log_handler():
    """A notebook's warning and logging settings are its own: a run sets ours while it lasts."""
    code = """
import logging, warnings
before = list(warnings.filters)
import finetune
added = [f for f in warnings.filters if f not in before]
tips = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
print(len(added), len(logging.getLogger("finetune").handlers), len(tips))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["0", "0"], out
    # Libraries imported by finetune may add their own filters; none of them mention finetune's.
    code_ours = code.replace(
        "print(len(added)",
        "print(len([f for f in added if f[1] is not None and "
        "('eval mode' in f[1].pattern or 'LeafSpec' in f[1].pattern)])",
    )
    assert (
        subprocess.run([sys.executable, "-c", code_ours], capture_output=True, text=True, check=True).stdout.split()[0]
        == "0"
    )


MAX_FUNCTION_LINES = 60
MAX_POSITIONAL = 8


def functions_of(path: Path):
    """(name, line, length in lines, positional parameters besides self/cls) of every function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args]
            if positional[:1] in (["self"], ["cls"]):
                positional = positional[1:]
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, len(positional)


@pytest.mark.parametrize("name", sorted(module_name(p) for p in PACKAGE.rglob("*.py")))
def test_functions_stay_short_and_take_few_positional_parameters(name):
    """A long function is several jobs; a long positional list is a config group that wants to be a
    small settings dataclass (options after ``*`` are keyword-only and do not count)."""
    path = PACKAGE.parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
    too_big = [
        f"{function} (line {line}): {length} lines, {positional} positional parameters"
        for function, line, length, positional in functions_of(path)
        if length > MAX_FUNCTION_LINES or positional > MAX_POSITIONAL
    ]
    assert not too_big, f"{name}: over {MAX_FUNCTION_LINES} lines or {MAX_POSITIONAL} positional parameters: {too_big}"


def test_the_size_checker_sees_a_long_function_and_a_long_argument_list(tmp_path):
    source = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source.write_text(f"def long():\n{body}\n\n\ndef wide(self, a, b, c, d, e, f, g, h, i, *, j=1):\n    pass\n")
    found = {name: (length, positional) for name, _, length, positional in functions_of(source)}
    assert found["long"][0] == MAX_FUNCTION_LINES + 1
    assert found["wide"][1] == 9


def test_tests_mirror_the_rooms():
    """A module's tests are found by its path: every folder of tests/ is a room of finetune/."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders and folders <= rooms, sorted(folders - rooms)
