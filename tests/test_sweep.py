"""Sweeps: every trial in its own folder, failures isolated, a ranked summary CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from conftest import QUICK, REPO, TINY


def test_multirun_grid_ranks_trials_and_isolates_a_failing_one(image_folder, tmp_path):
    args = ["-m", "+recipe=freeze_all_but_head", "data=folder", f"data.root={image_folder}", *TINY, *QUICK,
            "optimizer.name=sgd,lamb", "optimizer.lr=0.01,0.1", "hydra.sweep.dir=sweep"]
    proc = _finetune(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed"]
    assert [r["rank"] for r in rows[:2]] == ["1", "2"]
    assert float(rows[0]["val/acc"]) >= float(rows[1]["val/acc"])
    assert all("optimizer.name=sgd" in r["overrides"] for r in rows[:2])
    assert all("lamb" in r["error"] and "choose sgd or adamw" in r["error"] for r in rows[2:])
    for row in rows:
        assert (tmp_path / "sweep" / row["job"]).is_dir()
    assert (tmp_path / "sweep" / rows[2]["job"] / "error.txt").is_file()
    assert "ranked by val/acc" in proc.stdout and "optimizer.name=lamb optimizer.lr=0.1" in proc.stdout


def _finetune(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=timeout)


@pytest.mark.slow  # 3 CLI trials in 2 sweeps: 30-60 s on 2 busy cores
def test_optuna_study_records_failed_trials_and_continues_from_sqlite(image_folder, tmp_path):
    optuna = pytest.importorskip("optuna")  # the `sweep` extra, part of `test`
    base = ["-m", "+hparams_search=optuna", "+recipe=freeze_all_but_head", "data=folder", f"data.root={image_folder}",
            *TINY, *QUICK, "hydra.sweeper.study_name=study"]
    # optimizer.name=lamb fails in the optimizer factory: with seed 42 TPE draws sgd, then lamb.
    first = _finetune([*base, "optimizer.name=choice(sgd,lamb)", "hydra.sweeper.n_trials=2", "hydra.sweep.dir=s1"],
                      tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/multirun/optuna.db")
    states = [t.state.name for t in study.trials]
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "s1" / "summary.csv").open())}
    assert sorted(states) == ["COMPLETE", "FAIL"]
    for trial in study.trials:  # job N is trial N: the study and summary.csv agree
        row = rows[str(trial.number)]
        assert row["status"] == {"COMPLETE": "completed", "FAIL": "failed"}[trial.state.name]
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in row["overrides"]
        if trial.state.name == "COMPLETE":
            assert float(row["val/acc"]) == pytest.approx(trial.value)
        else:
            assert "choose sgd or adamw" in row["error"]
            assert (tmp_path / "s1" / row["job"] / "error.txt").is_file()
    assert set(study.best_trial.params) == {"optimizer.lr", "optimizer.weight_decay", "head.dropout", "optimizer.name"}
    assert (tmp_path / "s1" / "optimization_results.yaml").is_file()

    # The same study name continues the study (another machine would pass a database URL).
    again = _finetune([*base, "optimizer.name=sgd", "hydra.sweeper.n_trials=1", "hydra.sweep.dir=s2"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/multirun/optuna.db")
    assert len(study.trials) == 3 and study.trials[-1].state.name == "COMPLETE"


def _compose_hydra(overrides):
    """The full config, Hydra's own node included, as the CLI composes it."""
    from hydra import compose, initialize_config_dir

    from finetune.config import config_dir, register_recipes
    from finetune.train.sweep import register_resolvers

    register_recipes()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("space", ["optuna", "optuna_depth", "optuna_unfreeze", "optuna_techniques"])
def test_optuna_search_spaces_compose_and_name_real_keys(space, tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    cfg = _compose_hydra([f"+hparams_search={space}", "+recipe=freeze_all_but_head"])
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.sampler._target_.endswith("TPESampler")
    assert sweeper.sampler.seed == cfg.seed and sweeper.max_failure_rate == 1.0
    assert sweeper.storage == f"sqlite:///{tmp_path}/multirun/optuna.db" and (tmp_path / "multirun").is_dir()
    distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(distributions) == set(sweeper.params)
    for key in distributions:  # every searched key exists in the run config
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert type(distributions["optimizer.lr"]).__name__ == "LogUniformDistribution"
    if space == "optuna_depth":
        assert list(cfg.freeze.groups) == []  # the depth comes from freeze.until alone
    if space == "optuna_unfreeze":
        assert cfg.freeze.groups == "all" and distributions["freeze.unfreeze_at"].high < cfg.trainer.max_epochs


def _agent_command(sweep: dict, assignment: dict) -> list[str]:
    """The command `wandb agent` runs for one trial, expanded with wandb's own helpers the way
    wandb_agent.Agent._command_run does (macros ${...} replaced by lists of arguments)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    variables = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in assignment.items()}})
    variables.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    command = []
    for chunk in sweep_utils.create_sweep_command(sweep["command"]):
        chunk = str(chunk)
        command += variables.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


@pytest.mark.parametrize("path", sorted((REPO / "sweeps" / "wandb").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_yaml_drives_the_cli_with_hydra_overrides(path):
    import yaml
    from omegaconf import OmegaConf

    from finetune.config import compose_config

    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"] == {"name": "best/val/acc", "goal": "maximize"}  # what log_best writes
    assert "${args_no_hyphens}" in sweep["command"]
    # One trial per categorical value, each range at its low and high end.
    assignments = []
    for name, spec in sweep["parameters"].items():
        samples = spec["values"] if "values" in spec else [spec["min"], spec["max"]]
        assignments += [{name: value} for value in samples]
    for assignment in assignments:
        full = {n: (s["values"][0] if "values" in s else s["min"]) for n, s in sweep["parameters"].items()}
        full.update(assignment)
        command = _agent_command(sweep, full)
        assert command[:2] == ["/usr/bin/env", "finetune"], command
        cfg = compose_config(command[2:])
        for key, value in full.items():
            assert OmegaConf.select(cfg, key) == pytest.approx(value), (key, command)


def test_slurm_launcher_config_composes_for_ddp():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "+trainer.num_nodes=2",
                          "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.timeout_min == 240 and launcher.partition == "gpu"
    assert cfg.trainer.strategy == "ddp"
    defaults = _compose_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=1"]).hydra.launcher
    assert (defaults.nodes, defaults.partition) == (1, None)
