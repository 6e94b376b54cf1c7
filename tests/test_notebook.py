"""The notebook as a first-class home: in a real Jupyter kernel (nbclient), a run shows one HTML
panel updated in place, its result renders as HTML with its pictures inline, and the pictures a
person asks for (a batch, the mistakes) render as images. Outside a notebook nothing changes."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, write_class_folders

from finetune.config import compose_config
from finetune.console import in_notebook, screen, setup
from finetune.model.build import backbone_from_config, build_model
from finetune.tables import html_table
from finetune.train.live import NotebookPanel, notebook_screen
from finetune.train.run import plain_config
from finetune.use.load import FinetunedModel, Prediction
from finetune.use.notebook import Predictions
from finetune.viz.notebook import Shown, epoch_panel

PNG_URI = '<img src="data:image/png;base64,'
JPEG_URI = '<img src="data:image/jpeg;base64,'


def run_notebook(cells: list[str], cwd: Path, updates: list | None = None):
    """The executed notebook of `cells`, in a python3 kernel that imports this checkout's finetune;
    `updates` receives the HTML of every in-place display update, as the front end saw them."""
    import nbformat
    from nbclient import NotebookClient

    class Client(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            if updates is not None and msg["msg_type"] == "update_display_data":
                updates.append(msg["content"]["data"].get("text/html", ""))
            return super().process_message(msg, cell, cell_index)

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    client = Client(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return notebook


def stream_lines(outputs) -> list[str]:
    return [line for o in outputs if o.output_type == "stream" for line in o.text.splitlines() if line.strip()]


def data_with_one_wrong_label(root: Path) -> Path:
    """Learnable class folders whose validation split has one image filed under the wrong class."""
    write_class_folders(root / "train", per_class=8, seed=0)
    write_class_folders(root / "val", per_class=4, seed=1)
    shutil.move(root / "val" / "ants" / "ants_0.jpg", root / "val" / "bees" / "ants_0.jpg")
    return root


@pytest.mark.slow
def test_a_run_in_a_notebook_is_one_live_table_and_its_result_renders_with_pictures(tmp_path):
    data = data_with_one_wrong_label(tmp_path / "data")
    fit_cell = (
        "from finetune import fit\n"
        f"result = fit('freeze_all_but_head', data='folder', data__root={str(data)!r}, backbone__name='test_resnet', "
        "backbone__weights='random', data__image_size=32, trainer__max_epochs=3, trainer__accelerator='cpu', "
        f"data__num_workers=0, logger='none', paths__output_dir={str(tmp_path / 'run')!r})"
    )
    cells = [
        "import os\nos.environ['WANDB_MODE'] = 'disabled'\nimport finetune\nprint(finetune.__file__)",
        fit_cell,
        "result",
        "result.show_batch()",
        "result.show_mistakes(4)",
        "finetune.load(result.best_checkpoint)",
    ]
    notebook = run_notebook(cells, tmp_path)
    where, fit_out, shown, batch, mistakes, loaded = (c.outputs for c in notebook.cells)
    assert where[0].text.strip() == str(Path(__file__).resolve().parents[1] / "finetune" / "__init__.py")

    displays = [o for o in fit_out if o.output_type in ("display_data", "update_display_data")]
    assert len(displays) == 1 and "<table" in displays[0].data["text/html"]
    panel = displays[0].data["text/html"]  # nbclient applied every update in place
    assert all(f">{epoch}/3<" in panel for epoch in (1, 2, 3)), panel
    assert "val/acc=" in panel and "<details>" in panel
    assert len(stream_lines(fit_out)) <= 10, stream_lines(fit_out)

    html = shown[0].data["text/html"]
    assert html.count(PNG_URI) == 2 and "learning curves" in html and "confusion matrix" in html
    assert "best epoch" in html and "<script" not in html
    for picture in (batch, mistakes):
        data = picture[0].data
        assert PNG_URI in data["text/html"] and base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    assert "FinetunedModel" in loaded[0].data["text/html"] and "test_resnet" in loaded[0].data["text/html"]


@pytest.mark.slow  # a kernel and a 2-epoch full fine-tune of a tiny network: about 15 s
def test_the_bar_within_the_epoch_updates_in_place_in_a_real_kernel(tmp_path):
    data = data_with_one_wrong_label(tmp_path / "data")
    fit_cell = (
        "from finetune import fit\n"
        f"result = fit('full_finetune', data='folder', data__root={str(data)!r}, backbone__name='test_resnet', "
        "backbone__weights='random', data__image_size=32, data__batch_size=4, trainer__max_epochs=2, "
        f"trainer__accelerator='cpu', data__num_workers=0, logger='none', viz='none', "
        f"paths__output_dir={str(tmp_path / 'run')!r})"
    )
    updates: list[str] = []
    notebook = run_notebook(["import os\nos.environ['WANDB_MODE'] = 'disabled'", fit_cell], tmp_path, updates)
    bars = [html for html in updates if "<progress" in html]
    assert bars and "batch 1/6" in bars[0] and "epoch 1/2" in bars[0], updates[:3]  # 24 images, batch 4
    final = [o for o in notebook.cells[1].outputs if o.output_type == "display_data"]
    assert len(final) == 1 and "<progress" not in final[0].data["text/html"]  # the rows took the bar's place
    assert ">2/2<" in final[0].data["text/html"]


def test_outside_a_notebook_nothing_changes():
    """pytest, a terminal and a pipe are no notebook: the run's lines stay plain."""
    assert not in_notebook()
    handlers = list(logging.getLogger("finetune").handlers)
    with notebook_screen():
        assert logging.getLogger("finetune").handlers == handlers


def test_the_panel_takes_the_run_lines_and_gives_them_back(capsys):
    """Outside a kernel IPython's display prints text: the panel's state is what a notebook shows."""
    panel = NotebookPanel()
    logger = logging.getLogger("finetune.train.progress")
    plain = list(setup().handlers)
    with screen(panel):
        logger.info("data: 24 images\nclass  a  b")
        logger.info("header", extra={"epoch_columns": ["epoch", "val/acc"]})
        panel.progress = ("epoch 1/2", 3, 10)
        assert '<progress value="3" max="10"' in panel.html() and "batch 3/10" in panel.html()
        logger.info("row", extra={"epoch_cells": ["1/2", "0.5000"]})
        assert panel.progress is None  # the epoch's row takes the place of its bar
        logger.info("row", extra={"epoch_cells": ["2/2", "0.7500"]})
        logger.info("val/acc=0.7500")
    assert logging.getLogger("finetune").handlers == plain
    assert panel.setup == ["data: 24 images", "class  a  b"] and panel.rows == [["1/2", "0.5000"], ["2/2", "0.7500"]]
    html = panel.html()
    assert panel.after == ["val/acc=0.7500"]
    assert html.count("<tr>") == 3 and ">2/2<" in html and "<script" not in html and "val/acc=0.7500" in html


def test_html_is_escaped_and_self_contained():
    table = html_table(["a<b"], [["<script>x</script>"]])
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert "&lt;" in epoch_panel(["<b>"], [], [], [])
    shown = Shown(b"\x89PNG fake", "cap")
    assert shown._repr_png_() == b"\x89PNG fake" and PNG_URI in shown._repr_html_()


def test_predictions_and_a_loaded_model_render_as_tables(tmp_path):
    predictions = Predictions([Prediction("a.jpg", [("ants", 0.9), ("bees", 0.1)])])
    assert predictions == [Prediction("a.jpg", [("ants", 0.9), ("bees", 0.1)])]
    html = predictions._repr_html_()
    assert "a.jpg" in html and "0.900" in html and "bees 0.10" in html
    assert JPEG_URI not in html  # no such file: the row keeps its name, without a picture

    photo = write_class_folders(tmp_path, ("ants",), per_class=1) / "ants" / "ants_0.jpg"
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    shown = Predictions([Prediction(str(photo), [("ants", 0.8)]), Prediction("array(40x80)", [("bees", 0.6)])])
    shown.inputs = [str(photo), pixels]  # a path and an in-memory image, as predict() keeps them
    html = shown._repr_html_()
    assert html.count(JPEG_URI) == 2 and "max-height:64px" in html

    cfg = compose_config(TINY)
    backbone = backbone_from_config(cfg)
    model = build_model(backbone, 2, cfg.head, cfg.freeze)
    loaded = FinetunedModel(
        model, ["ants", "bees"], backbone.data_config, plain_config(cfg), trust={"temperature": 1.25}
    )
    html = loaded._repr_html_()
    assert "test_resnet" in html and "ants, bees" in html and "1.250" in html


# notebook -> (at least this many inline PNGs, texts its outputs must show)
EXAMPLES = {
    "first_finetune": (5, ["FitResult", "FinetunedModel", "prediction set", JPEG_URI]),
    "multilabel": (3, ["labels per image", "val/map", "average precision per label", "thresholds"]),
    "trust_and_audit": (5, ["duplicates across splits", "AuditReport", "likely label errors", "calibration"]),
    "auto": (1, ["AutoResult", "learning curves", "leaderboard, best first", "freeze_all_but_head", "FinetunedModel"]),
}


def test_every_example_notebook_is_executed_by_the_tests():
    found = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "docs" / "notebooks").glob("*.ipynb"))
    assert found == sorted(EXAMPLES)


@pytest.mark.slow  # each notebook: a kernel and one to three tiny runs, 25-50 s on 2 cores
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_notebooks_run_and_show_their_pictures(name, tmp_path):
    """docs/notebooks/NAME.ipynb, executed as a reader would: a broken API fails here."""
    import nbformat

    source = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / f"{name}.ipynb"
    notebook = nbformat.read(source, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    executed = run_notebook([c.source for c in notebook.cells if c.cell_type == "code"], tmp_path)
    errors = [o for c in executed.cells for o in c.outputs if o.output_type == "error"]
    assert errors == [], [f"{e.ename}: {e.evalue}" for e in errors]
    html = "".join(o.data.get("text/html", "") for c in executed.cells for o in c.outputs if "data" in o)
    pictures, texts = EXAMPLES[name]
    assert html.count(PNG_URI) >= pictures and [t for t in texts if t not in html] == []
    for cell in executed.cells:  # a run is one panel; a search's trials print one line each, no panel
        search = '"auto"' in cell.source and "fit(" in cell.source
        panels = [o for o in cell.outputs if o.output_type == "display_data" and "finetune-run" in o.data["text/html"]]
        assert len(panels) <= (0 if search else 1), cell.source
        lines = [line for line in stream_lines(cell.outputs) if not (search and line.startswith("trial "))]
        assert len(lines) <= 10, lines


def test_check_data_returns_the_report_a_notebook_renders(image_folder):
    from finetune import check_data

    (image_folder / "train" / "ants" / "broken.jpg").write_bytes(b"not a jpeg")
    report = check_data(TINY, data="folder", data__root=str(image_folder))
    assert report.counts["train"] == {"ants": 8, "bees": 8, "wasps": 8} and len(report.skipped) == 1
    html = report._repr_html_()
    assert all(f">{c}<" in html for c in ("ants", "bees", "wasps", "total", "train", "val"))
    assert ">24<" in html and ">12<" in html and "broken.jpg" in html and "1 skipped files" in html
    assert "<script" not in html


def test_audit_returns_a_report_with_its_facts_pictures_and_files(image_folder, tmp_path):
    from finetune import audit

    shutil.move(image_folder / "val" / "ants" / "ants_0.jpg", image_folder / "val" / "bees" / "ants_0.jpg")
    report = audit(TINY, data="folder", data__root=str(image_folder), folds=2, top=4, out=str(tmp_path / "a"))
    assert [p.name for p in report.files][:2] == ["audit.csv", "audit.json"] and report.folder == tmp_path / "a"
    assert report.lines()[0].startswith("audited 36 images (train 24, val 12), 3 classes, test_resnet features")
    html = report._repr_html_()
    assert "AuditReport" in html and "k-fold accuracy" in html and str(tmp_path / "a") in html
    flagged = report.audit.label_issue.sum() + report.audit.outlier.sum()
    assert html.count(PNG_URI) == (flagged > 0) + (len(report.audit.pairs) > 0)
    if flagged:
        assert "the first suspects" in html and report.show_suspects(2)._repr_png_()[:4] == b"\x89PNG"


def test_an_auto_result_renders_its_leaderboard():
    from finetune.search.auto import AutoResult

    row = {"trial": 0, "backbone": "test_resnet", "recipe": "lp_ft", "lr": 0.003, "weight_decay": 1e-4}
    rows = [{**row, "score": 0.75, "state": "COMPLETE", "epochs": 3, "seconds": 12, "checkpoint": "t/0/best.ckpt"}]
    rows.append({**row, "trial": 1, "score": None, "state": "PRUNED", "epochs": 1, "seconds": 4, "checkpoint": ""})
    result = AutoResult(Path("out/best.ckpt"), 0.75, rows, Path("out"), 20.0, 60.0)
    html = result._repr_html_()
    assert "2 trials in 20 s of a 60 s budget; best 0.7500: out/best.ckpt" in html
    assert ">lp_ft<" in html and ">0.003<" in html and ">pruned<" in html and ">-<" in html
    assert result.table()[1][0][:3] == [0, "test_resnet", "lp_ft"]
    assert result.show_curves() is None and PNG_URI not in html  # the best trial's folder is not here
