"""finetune auto: ranking, an Optuna search of real runs within a wall-time budget, the
leaderboard, the best checkpoint, and a search killed and continued without repeating a trial."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_refused, finetune_cli, write_class_folders

TINY_AUTO = [
    "auto.backbones=[test_resnet,test_efficientnet,test_vit]",
    "auto.top=2",
    "auto.folds=3",
    "auto.recipes=[freeze_all_but_head,full_finetune]",
    "backbone.weights=random",
    "data.image_size=32",
    "data.num_workers=0",
    "logger=none",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    write_class_folders(root / "data" / "train", per_class=10)
    write_class_folders(root / "data" / "val", per_class=5, seed=1)
    return root


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45)])
def test_budgets_read_as_durations(text, seconds):
    from finetune.search.auto import parse_budget

    assert parse_budget(text) == seconds


@pytest.mark.slow
def test_auto_searches_within_its_budget_and_keeps_the_best_run(folders, tmp_path):
    """fit("auto", ...) as a notebook would: the top backbones only, trials of both recipes, the
    budget kept, the leaderboard sorted, best.ckpt the best trial's weights."""
    import finetune
    from finetune import fit

    started = time.perf_counter()
    result = fit(
        "auto",
        [*TINY_AUTO, "data=folder", f"data.root={folders / 'data'}"],
        time_budget="45s",
        out=str(tmp_path / "auto"),
    )
    wall = time.perf_counter() - started
    assert result.seconds <= 45 * 1.1 and wall <= 45 * 1.1 + 15  # + start-up and the closing report
    rows = list(csv.DictReader((tmp_path / "auto" / "leaderboard.csv").open()))
    # At least the two shipped recipes; how many more fit depends on how busy the machine is.
    assert len(rows) == len(result.leaderboard) >= 2
    assert {r["backbone"] for r in rows} <= {"test_resnet", "test_efficientnet", "test_vit"}
    assert len({r["backbone"] for r in rows}) <= 2  # auto.top=2: one backbone was left out after ranking
    assert {r["recipe"] for r in rows} <= {"freeze_all_but_head", "full_finetune"}
    finished = [float(r["score"]) for r in rows if r["state"] == "COMPLETE"]
    assert finished == sorted(finished, reverse=True) and result.score == finished[0]
    first = {r["trial"]: r for r in rows}
    # The search starts from the recipes as shipped, on the best-ranked backbone.
    assert (first["0"]["recipe"], float(first["0"]["lr"]), float(first["0"]["weight_decay"])) == (
        "freeze_all_but_head",
        0.01,
        1e-4,
    )
    assert first["1"]["recipe"] == "full_finetune" and float(first["1"]["lr"]) == pytest.approx(0.001)
    assert first["0"]["backbone"] == first["1"]["backbone"]
    best = finetune.load(result.checkpoint)
    assert best.classes == ["ants", "bees", "wasps"]
    assert best.config["backbone"]["name"] == rows[0]["backbone"]


@pytest.mark.slow
def test_auto_killed_mid_search_goes_on_without_repeating_a_trial(folders, tmp_path):
    import optuna

    out = tmp_path / "auto"
    args = [*TINY_AUTO, "data=folder", f"data.root={folders / 'data'}", f"out={out}"]
    search = subprocess.Popen(
        [sys.executable, "-m", "finetune", "auto", "time_budget=300s", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "trials").glob("*"))) < 4:
            assert search.poll() is None, search.stderr.read()
            time.sleep(0.2)
    finally:
        os.kill(search.pid, signal.SIGKILL)
        search.wait()
    storage = f"sqlite:///{out / 'auto.db'}"
    before = {
        t.number: (t.state.name, t.value, t.params)
        for t in optuna.load_study(study_name="auto", storage=storage).trials
    }
    finished = {n for n, (state, _, _) in before.items() if state in ("COMPLETE", "PRUNED")}
    assert len(finished) >= 2
    spent = optuna.load_study(study_name="auto", storage=storage).user_attrs["seconds"]
    # The budget counts what the killed search spent: 15 s more than that leaves room for a few trials.
    again = finetune_cli("auto", f"time_budget={spent + 15:.0f}s", "resume=true", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    after = {
        t.number: (t.state.name, t.value, t.params)
        for t in optuna.load_study(study_name="auto", storage=storage).trials
    }
    for number in finished:  # the same trials, the same results: none ran again
        assert after[number] == before[number]
    killed = [n for n, (state, _, _) in before.items() if state == "RUNNING"]
    assert all(after[n][0] == "FAIL" for n in killed)
    assert len(after) > len(before)
    assert "leaderboard" in again.stdout and (out / "best.ckpt").is_file()

    assert_refused(finetune_cli("auto", "time_budget=30s", *args), "resume=true")


@pytest.mark.slow
def test_auto_leaderboard_is_a_wandb_table_when_wandb_is_on(folders, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "auto"
    args = [a for a in TINY_AUTO if a != "logger=none"]
    result = finetune_cli(
        "auto", "time_budget=60s", *args, "logger=wandb", "data=folder", f"data.root={folders / 'data'}", f"out={out}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tables = list(out.glob("wandb/offline-run-*/files/media/table/leaderboard_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert table["columns"][:3] == ["trial", "backbone", "recipe"] and len(table["data"]) == len(rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["time_budget=soon"], "give a duration"),
        (["time_budget=0s"], "positive duration"),
        (["auto.recipes=[freeze_all_but_head,magic]"], "no recipe magic"),
        (["auto.top=0"], "auto.top=0 must be at least 1"),
        (["resume=true"], "resume=true needs out=DIR"),
        (["task=multilabel"], "multi-label"),
    ],
)
def test_auto_refuses_bad_options_in_one_line(args, message):
    assert_refused(finetune_cli("auto", "data=digits", *args), message)


def test_auto_resume_needs_a_search_to_go_on_with(tmp_path):
    assert_refused(finetune_cli("auto", "data=digits", "resume=true", f"out={tmp_path}"), "holds no auto search")


@pytest.mark.slow
def test_auto_logs_each_trial_as_an_mlflow_run_in_one_store(folders, tmp_path):
    mlflow = pytest.importorskip("mlflow")  # the `loggers` extra, part of `test`
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "auto"
    args = [a for a in TINY_AUTO if a != "logger=none"]
    data = ["data=folder", f"data.root={folders / 'data'}", f"out={out}"]
    result = finetune_cli("auto", "time_budget=60s", *args, "logger=mlflow", *data, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = sorted(p.name for p in (out / "trials").iterdir() if (p / "summary.json").is_file())
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert trials and sorted(r.info.run_name for r in runs if r.info.status == "FINISHED") == [
        f"trials/{n}" for n in trials
    ]
    assert {r.data.tags["finetune.group"] for r in runs} == {str(out.resolve())}
    assert not list((out / "trials").glob("*/mlruns"))  # no store per trial
