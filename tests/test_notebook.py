"""The notebook as a first-class home: in a real Jupyter kernel (nbclient), a run shows one HTML
panel updated in place, its result renders as HTML with its pictures inline, and the pictures a
person asks for (a batch, the mistakes) render as images. Outside a notebook nothing changes."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY, write_class_folders

from finetune.config import compose_config
from finetune.console import in_notebook, screen, setup
from finetune.model.build import backbone_from_config, build_model
from finetune.train.live import NotebookPanel, notebook_screen
from finetune.train.run import plain_config
from finetune.use.load import FinetunedModel, Prediction
from finetune.use.notebook import Predictions, html_table
from finetune.viz.notebook import Shown, epoch_panel

PNG_URI = '<img src="data:image/png;base64,'


def run_notebook(cells: list[str], cwd: Path):
    """The executed notebook of `cells`, in a python3 kernel that imports this checkout's finetune."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
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


def test_predictions_and_a_loaded_model_render_as_tables():
    predictions = Predictions([Prediction("a.jpg", [("ants", 0.9), ("bees", 0.1)])])
    assert predictions == [Prediction("a.jpg", [("ants", 0.9), ("bees", 0.1)])]
    html = predictions._repr_html_()
    assert "a.jpg" in html and "0.900" in html and "bees 0.10" in html

    cfg = compose_config(TINY)
    backbone = backbone_from_config(cfg)
    model = build_model(backbone, 2, cfg.head, cfg.freeze)
    loaded = FinetunedModel(
        model, ["ants", "bees"], backbone.data_config, plain_config(cfg), trust={"temperature": 1.25}
    )
    html = loaded._repr_html_()
    assert "test_resnet" in html and "ants, bees" in html and "1.250" in html


@pytest.mark.slow
def test_the_example_notebook_runs_and_shows_its_pictures(tmp_path):
    """docs/notebooks/first_finetune.ipynb, executed as a reader would: a broken API fails here."""
    import nbformat

    source = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "first_finetune.ipynb"
    notebook = nbformat.read(source, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    executed = run_notebook([c.source for c in notebook.cells if c.cell_type == "code"], tmp_path)
    html = [o.data.get("text/html", "") for c in executed.cells for o in c.outputs if "data" in o]
    assert sum(PNG_URI in h for h in html) >= 5  # the result, batch, mistakes, confusion, curves
    assert any("FinetunedModel" in h for h in html) and any("prediction set" in h for h in html)
    assert all(o.output_type != "error" for c in executed.cells for o in c.outputs)
