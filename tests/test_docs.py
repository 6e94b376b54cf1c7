"""The docs: a README a newcomer reads in five minutes, a site whose every page is reachable, a config
reference that follows conf/ and recipes/, and a strict MkDocs build."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    """Every page path in mkdocs.yml's nav (a nested list of {title: page or list})."""
    pages = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _readme_docs_links() -> set[str]:
    """Paths (relative to docs/) the README links to."""
    links = {m.group(1) for m in LINK.finditer(README.read_text())}
    return {link.removeprefix("docs/") for link in links if link.startswith("docs/")}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move the detail into docs/ (limit 300)"


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    assert ".venv/bin/pip install . && .venv/bin/finetune +recipe=freeze_all_but_head" in text
    after_marker = text.split("<!-- ci: test command -->\n", 1)[1].splitlines()
    assert after_marker[0] == "```bash"
    command = after_marker[1]
    assert "mkdocs build --strict" in command
    assert command.index("mkdocs build --strict") < command.index("python -m pytest")


def test_every_docs_page_is_reachable_and_every_nav_page_exists():
    nav = _nav_pages(yaml.safe_load(MKDOCS_YML.read_text())["nav"])
    generated = {_hook().PAGE}
    missing = [page for page in nav if page not in generated and not (DOCS / page).is_file()]
    assert missing == [], f"mkdocs.yml's nav names pages that do not exist: {missing}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    orphans = sorted(pages - set(nav) - _readme_docs_links())
    assert orphans == [], f"pages neither in mkdocs.yml's nav nor on the README's map: {orphans}"


def test_readme_map_links_every_guide_and_benchmark_page_and_nothing_missing():
    linked = _readme_docs_links()
    pages = {p.relative_to(DOCS).as_posix() for p in [*DOCS.glob("guide/*.md"), *DOCS.glob("benchmarks/*.md")]}
    assert len(pages) >= 10
    assert sorted(pages - linked) == [], "the README's map of the docs misses these pages"
    broken = sorted(link for link in linked if not (DOCS / link).exists())
    assert broken == [], f"the README links to docs that do not exist: {broken}"


def test_config_reference_lists_every_config_file_and_recipe():
    page = _hook().config_reference(ROOT / "conf", ROOT / "recipes")
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        if path.name == "config.yaml" and path.parent == ROOT / "conf":
            continue
        group = path.parent.relative_to(ROOT / "conf").as_posix()
        assert f"`{group}={path.stem}`" in page or f"`{group}/{path.stem}`" in page, path
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert f"### `+recipe={path.stem}`" in page, path
    # a default, its comment and a recipe's header, as the files write them
    assert "| `trust.calibration_fraction` | `0.0` |" in page
    assert "Exponential moving average of the weights" in page
    assert "LP-FT (Kumar et al. 2022" in page


def test_config_reference_changes_when_a_default_changes(tmp_path):
    hook = _hook()
    conf, recipes = tmp_path / "conf", tmp_path / "recipes"
    shutil.copytree(ROOT / "conf", conf)
    shutil.copytree(ROOT / "recipes", recipes)
    before = hook.config_reference(conf, recipes)
    assert "| `trainer.max_epochs` | `10` |" in before

    trainer = conf / "trainer" / "default.yaml"
    text = trainer.read_text()
    assert "\nmax_epochs: 10\n" in text
    trainer.write_text(text.replace("\nmax_epochs: 10\n", "\nmax_epochs: 37  # as a test set them\n"))
    recipe = recipes / "lp_ft.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 0.001", "lr: 0.0042"))

    after = hook.config_reference(conf, recipes)
    assert after != before
    assert "| `trainer.max_epochs` | `37` | as a test set them |" in after
    assert "| `trainer.max_epochs` | `10` |" not in after
    lp_ft = after[after.index("### `+recipe=lp_ft`") :]
    assert "| `optimizer.lr` | `0.0042` |" in lp_ft.split("\n### ")[0]


def test_mkdocs_build_is_strict_clean(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        message = "mkdocs or mkdocs-material is not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "reference" / "config" / "index.html").is_file()
    assert (site / "guide" / "data" / "index.html").is_file()
