"""The run's report page (viz/index.html): beside index.md, self-contained, true to summary.json,
honest about what it lacks, and safe with hostile names. Loaded in a real headless browser."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import QUICK_WITH_PICTURES, TINY, write_class_folders
from PIL import Image

from finetune import fit
from finetune.commands import viz_command
from finetune.train.optim import group_lrs
from finetune.viz.html_report import write_page
from finetune.viz.report import Picture


class Links(HTMLParser):
    """Every tag name, every URL-valued attribute and the text of every <style> of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.styles, self._in_style = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_style = tag == "style"
        self.urls += [
            value
            for name, value in attrs
            if name in ("src", "href", "srcset", "action", "poster", "data", "formaction", "background")
            and value is not None
        ]

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def assert_nothing_leaves(page: Path) -> None:
    """No script, no stylesheet or font link, no frame; every link relative (a file beside the
    page or an anchor in it) or a data: URI."""
    links = Links()
    links.feed(page.read_text())
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(links.tags)
    for url in links.urls:
        parsed = urlparse(url)
        assert parsed.scheme in ("", "data") and not parsed.netloc and not url.startswith(("/", "\\")), url
    style = "".join(links.styles)
    assert "url(" not in style and "@import" not in style


def rendered(browser, page: Path) -> dict:
    """What a browser shows of `page`: title, headings, images, requests, table cells, texts."""
    browser.get(page.resolve().as_uri())
    return browser.execute_script("""
        const rows = id => [...document.querySelectorAll('#' + id + ' tr')].map(
            r => [...r.cells].map(c => c.textContent.trim()));
        const text = sel => [...document.querySelectorAll(sel)].map(e => e.textContent);
        return {
            title: document.title,
            h2: text('h2'), h3: text('h3'),
            images: [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
            requests: performance.getEntriesByType('resource').map(e => e.name),
            metrics: rows('metrics-table'), counts: rows('counts-table'),
            groups: text('#groups-table').join(''), config: text('#config-yaml').join(''),
            missing: text('.missing'), scripts: document.scripts.length, pwned: window.pwned ?? null,
            body: document.body.innerText,
        };""")


def assert_every_image_loaded(shown: dict, page: Path) -> None:
    assert shown["images"], "no picture on the page"
    for src, complete, width in shown["images"]:
        assert complete and width > 0, f"{src} did not load"
    assert all(url.startswith("file://") for url in shown["requests"]), shown["requests"]
    assert all(url.startswith(page.parent.resolve().as_uri()) for url in shown["requests"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    write_class_folders(root / "data" / "train", per_class=8)
    write_class_folders(root / "data" / "val", per_class=4, seed=1)
    result = fit(
        "full_finetune",
        TINY
        + QUICK_WITH_PICTURES
        + ["data=folder", f"data.root={root / 'data'}", "trainer.max_epochs=2", f"hydra.run.dir={root / 'run'}"],
    )
    return result, root


def test_a_run_writes_a_self_contained_page_true_to_its_summary(run, browser):
    result, _ = run
    viz = result.output_dir / "viz"
    page = viz / "index.html"
    assert page.is_file() and (viz / "index.md").is_file()
    assert result.outputs["report"] == page and list(result.outputs).index("report") > list(result.outputs).index(
        "pictures"
    )
    assert_nothing_leaves(page)
    shown = rendered(browser, page)
    summary = json.loads((result.output_dir / "summary.json").read_text())

    assert "finetune report" in shown["title"] and result.output_dir.name in shown["title"]
    assert shown["h2"] == ["Metrics", "Data", "Layer groups", "Pictures", "Config"]
    assert shown["missing"] == [] and shown["scripts"] == 0
    # every picture index.md lists, with its caption, and every one of them loaded from disk
    listed = [
        line.split("(")[1].rstrip(")") for line in (viz / "index.md").read_text().splitlines() if line.startswith("![")
    ]
    assert sorted(src for src, _, _ in shown["images"]) == sorted(listed)
    assert_every_image_loaded(shown, page)
    for picture in ("filters", "curves", "confusion", "mistakes", "patches_stage1"):
        assert picture in shown["h3"]
    assert "First-layer filters" in shown["body"]

    metrics = dict(row for row in shown["metrics"][1:])
    assert metrics["val/acc"] == f"{summary['metrics']['val/acc']:.4f}"
    assert f"validation: {summary['data']['images']['val']} images" in shown["body"]
    header, *rows = shown["counts"]
    splits = header[1:]
    assert "train" in splits and "val" in splits
    counts = summary["data"]["counts"]
    for row in rows[:-1]:
        assert [int(n) for n in row[1:]] == [counts[s][row[0]] for s in splits]
    assert [r[0] for r in rows[:-1]] == summary["classes"]
    assert [int(n) for n in rows[-1][1:]] == [summary["data"]["images"][s] for s in splits]

    group_rows = [line.split()[0] for line in shown["groups"].splitlines()[2:] if not line.startswith("total")]
    assert group_rows == [g.name for g in result.model.groups]
    lrs = group_lrs(result.model, result.config["optimizer"])  # the run's lrs, as its start table showed them
    assert lrs and all(
        f"{lrs[line.split()[0]]:.3g}" in line.split()
        for line in shown["groups"].splitlines()[2:]
        if line.split()[0] in lrs
    )
    assert "name: test_resnet" in shown["config"]


def test_viz_of_a_checkpoint_without_summary_says_what_is_missing(run, browser, tmp_path):
    result, root = run
    moved = tmp_path / "elsewhere" / "model.ckpt"  # no summary.json beside its folder
    moved.parent.mkdir()
    shutil.copy(result.best_checkpoint, moved)
    out = tmp_path / "pictures"
    assert viz_command([f"ckpt={moved}", f"input={root / 'data' / 'val'}", f"out={out}"]) == 0
    page = out / "index.html"
    assert page.is_file() and (out / "index.md").is_file()
    assert_nothing_leaves(page)
    shown = rendered(browser, page)
    assert shown["h2"] == ["Metrics", "Data", "Layer groups", "Pictures", "Config"]
    assert_every_image_loaded(shown, page)
    missing = " ".join(shown["missing"])
    assert "no summary.json" in missing and str(tmp_path / "summary.json") in missing
    assert "metrics" in missing and "data report" in missing and "lr" in missing
    assert shown["metrics"] == [] and shown["counts"] == []
    assert all(g.name in shown["groups"] for g in result.model.groups)  # from the checkpoint's model
    assert "name: test_resnet" in shown["config"]


def test_hostile_names_are_shown_as_text_never_run(browser, tmp_path):
    """A class named like a script, a caption with an event handler, a config value that closes
    the <pre>, a picture file name with a space and a #: all text, and the picture still loads."""
    hostile = "<script>window.pwned = 1</script>"
    picture = tmp_path / "odd name #1.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(picture)
    summary = {
        "metrics": {"epoch": 1, "val/acc": 0.5, "val/loss": 0.7},
        "classes": [hostile, "bees"],
        "history": [{"epoch": 1}],
        "data": {
            "description": "<img src=x onerror='window.pwned = 2'>",
            "classes": [hostile, "bees"],
            "counts": {"train": {hostile: 3, "bees": 4}, "val": {hostile: 1, "bees": 2}},
            "skipped": [["a<b>.jpg", "<script>window.pwned = 3</script>"]],
            "size_range": [1, 2, 3, 4],
            "duplicates": [],
            "conflicts": [],
            "near_blank": [],
            "warnings": [hostile],
            "images": {"train": 7, "val": 3},
        },
    }
    config = {"backbone": {"name": "</pre><script>window.pwned = 4</script>"}}
    page = write_page(
        tmp_path,
        [Picture('x"><script>window.pwned=5</script>', picture, "caption <img src=y onerror='window.pwned = 6'>")],
        None,
        summary,
        config,
    )
    assert_nothing_leaves(page)
    shown = rendered(browser, page)
    assert shown["pwned"] is None and shown["scripts"] == 0
    assert_every_image_loaded(shown, page)
    assert [row[0] for row in shown["counts"][1:]] == [hostile, "bees", "total"]
    assert hostile in shown["body"] and "</pre><script>window.pwned = 4</script>" in shown["config"]
    assert "caption <img src=y onerror='window.pwned = 6'>" in shown["body"]
    assert "the model has no layer groups" in " ".join(shown["missing"])
