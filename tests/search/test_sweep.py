"""Sweeps: every trial in its own folder, failures isolated, a ranked summary CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from conftest import QUICK, REPO, TINY


def test_multirun_grid_ranks_trials_and_isolates_a_failing_one(image_folder, tmp_path):
    args = [
        "-m",
        "+recipe=freeze_all_but_head",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        "optimizer.name=sgd,lamb",
        "optimizer.lr=0.01,0.1",
        "hydra.sweep.dir=sweep",
    ]
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
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=timeout,
    )


@pytest.mark.slow  # 3 CLI trials in 2 sweeps: 30-60 s on 2 busy cores
def test_optuna_study_records_failed_trials_and_continues_from_sqlite(image_folder, tmp_path):
    optuna = pytest.importorskip("optuna")  # the `sweep` extra, part of `test`
    base = [
        "-m",
        "+hparams_search=optuna",
        "+recipe=freeze_all_but_head",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        "hydra.sweeper.study_name=study",
    ]
    # optimizer.name=lamb fails in the optimizer factory: with seed 42 TPE draws sgd, then lamb.
    first = _finetune(
        [*base, "optimizer.name=choice(sgd,lamb)", "hydra.sweeper.n_trials=2", "hydra.sweep.dir=s1"], tmp_path
    )
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
    from finetune.search.sweep import register_resolvers

    register_recipes()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("space", ["optuna", "optuna_depth", "optuna_unfreeze", "optuna_techniques"])
def test_optuna_search_spaces_compose_and_name_real_keys(space, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from omegaconf import OmegaConf

    from finetune.search.optuna_sweeper import search_space

    monkeypatch.chdir(tmp_path)
    cfg = _compose_hydra([f"+hparams_search={space}", "+recipe=freeze_all_but_head"])
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.sampler._target_.endswith("TPESampler")
    assert sweeper.sampler.seed == cfg.seed and sweeper.max_failure_rate == 1.0
    assert sweeper.storage == f"sqlite:///{tmp_path}/multirun/optuna.db" and (tmp_path / "multirun").is_dir()
    distributions, fixed = search_space([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(distributions) == set(sweeper.params)
    for key in distributions:  # every searched key exists in the run config
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert type(distributions["optimizer.lr"]).__name__ == "FloatDistribution" and distributions["optimizer.lr"].log
    if space == "optuna_depth":
        assert list(cfg.freeze.groups) == []  # the depth comes from freeze.until alone
    if space == "optuna_unfreeze":
        assert cfg.freeze.groups == "all" and distributions["freeze.unfreeze_at"].high < cfg.trainer.max_epochs


def test_optuna_space_reads_every_sweep_syntax_and_passes_fixed_overrides_through():
    optuna = pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from finetune.search.optuna_sweeper import search_space, trial_overrides

    params = [
        "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
        "head.dropout=interval(0.0, 0.5)",
        "freeze.unfreeze_at=int(interval(1, 9))",
        "trainer.max_epochs=range(5, 20, 5)",
        "freeze.until=choice(stem, stage1)",
        "mixup.alpha=choice(0.0, 0.2)",
    ]
    # The command line comes after the file's params: a sweep or a fixed value there replaces them.
    command_line = [
        "+recipe=freeze_all_but_head",
        "optimizer.name=choice(sgd,lamb)",
        "data.batch_size=16,32",
        "head.dropout=0.1",
        "freeze.until=choice(stage2,stage3)",
        "data.root='/my data'",
    ]
    distributions, fixed = search_space(params + command_line)
    assert distributions == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
        "freeze.unfreeze_at": IntDistribution(1, 9),
        "trainer.max_epochs": IntDistribution(5, 15, step=5),  # Hydra's range: 20 excluded
        "freeze.until": CategoricalDistribution(["stage2", "stage3"]),
        "mixup.alpha": CategoricalDistribution([0.0, 0.2]),
        "optimizer.name": CategoricalDistribution(["sgd", "lamb"]),
        "data.batch_size": CategoricalDistribution([16, 32]),
    }
    assert fixed == {
        "+recipe": "+recipe=freeze_all_but_head",
        "head.dropout": "head.dropout=0.1",
        "data.root": "data.root='/my data'",
    }
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(distributions)
    overrides = trial_overrides(trial.params, fixed)
    assert overrides[-3:] == list(fixed.values())
    assert f"optimizer.lr={trial.params['optimizer.lr']}" in overrides
    assert trial_overrides({"a": "x,y", "b": True}, {}) == ["a=x\\,y", "b=True"]  # one value each for Hydra


def _optuna_app(tmp_path, monkeypatch, task, *overrides):
    """Run `task` as a Hydra app under finetune's Optuna sweeper, in this process, with a one-key
    config; returns (exit code, the study)."""
    import hydra
    import optuna
    from hydra.core.global_hydra import GlobalHydra

    from finetune.config import config_dir

    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "tiny.yaml").write_text(
        "defaults: [{override hydra/sweeper: optuna}, {override hydra/job_logging: none},"
        " {override hydra/hydra_logging: none}, _self_]\n"
        f"x: 0.0\nhydra:\n  searchpath: ['file://{config_dir()}']\n"
        f"  sweep: {{dir: '{tmp_path}/sweep', subdir: '${{hydra.job.num}}'}}\n"
        f"  sweeper: {{storage: 'sqlite:///{tmp_path}/optuna.db', study_name: tiny, n_jobs: 1,"
        " sampler: {seed: 0}, params: {x: 'interval(0.0, 1.0)'}}\n"
    )
    monkeypatch.setattr(sys, "argv", ["tiny", "-m", *overrides])
    code = 0
    try:
        hydra.main(config_path=str(conf), config_name="tiny", version_base="1.3")(task)()
    except SystemExit as stop:
        code = stop.code
    finally:
        GlobalHydra.instance().clear()
    return code, optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")


def test_optuna_sweeper_minimizes_numbers_jobs_by_trial_and_continues_the_study(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    seen = []

    def task(cfg):
        seen.append((HydraConfig.get().job.num, cfg.x))
        return (cfg.x - 0.3) ** 2

    code, study = _optuna_app(
        tmp_path,
        monkeypatch,
        task,
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.n_jobs=2",
    )
    assert code == 0 and [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert [n for n, _ in seen] == [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert [x for _, x in seen] == [t.params["x"] for t in study.trials]
    assert study.best_value == min(t.value for t in study.trials)
    assert study.trials[3].user_attrs["output_dir"] == str(tmp_path / "sweep" / "3")
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_value == study.best_value and results.best_params == {"x": study.best_params["x"]}

    # The same study_name continues the study; the jobs go on with its numbering.
    code, study = _optuna_app(
        tmp_path,
        monkeypatch,
        task,
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=2",
        "x=interval(0.2, 0.4)",
    )
    assert code == 0 and len(study.trials) == 7 and [n for n, _ in seen[5:]] == [5, 6]
    assert all(0.2 <= x <= 0.4 for _, x in seen[5:]) and (tmp_path / "sweep" / "6").is_dir()
    # A key searched another way (a choice now, an interval before) is refused before any trial.
    code, study = _optuna_app(tmp_path, monkeypatch, task, "x=choice(0.25,0.5)")
    assert code == 1 and len(study.trials) == 7


def test_jobs_keep_their_trial_numbers_when_another_process_shares_the_study(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from hydra.core.hydra_config import HydraConfig

    ask = optuna.Study.ask

    def ask_beside_another_worker(study, *args, **kwargs):
        trial = ask(study, *args, **kwargs)
        other = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path}/optuna.db")
        other.tell(ask(other), 0.5)  # another process takes the next number
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_beside_another_worker)
    jobs = []
    code, study = _optuna_app(
        tmp_path,
        monkeypatch,
        lambda cfg: jobs.append(HydraConfig.get().job.num) or cfg.x,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
    )
    assert code == 0 and jobs == [0, 2, 4, 6] and len(study.trials) == 8
    assert all(study.trials[n].user_attrs["output_dir"] == str(tmp_path / "sweep" / str(n)) for n in jobs)


def test_optuna_sweeper_stops_at_the_first_failure_with_max_failure_rate_0(tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna")

    def task(cfg):
        raise ValueError("no such optimizer")

    code, study = _optuna_app(
        tmp_path, monkeypatch, task, "hydra.sweeper.max_failure_rate=0.0", "hydra.sweeper.n_trials=4"
    )
    assert code == 1 and [t.state.name for t in study.trials] == ["FAIL"]
    err = capsys.readouterr().err
    assert "1 of 1 trials failed, more than hydra.sweeper.max_failure_rate=0.0 allows" in err
    assert "no such optimizer" in err and "max_failure_rate=1.0" in err


def test_failed_nan_and_pruned_trials_never_stop_a_study_with_max_failure_rate_1(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from hydra.core.hydra_config import HydraConfig

    def task(cfg):
        kind = HydraConfig.get().job.num % 4
        if kind == 1:
            raise ValueError("diverged")
        if kind == 3:
            raise optuna.TrialPruned()
        return float("nan") if kind == 2 else cfg.x

    code, study = _optuna_app(
        tmp_path,
        monkeypatch,
        task,
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.n_jobs=2",
    )
    assert code == 0
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "PRUNED"] * 2
    assert study.best_value == max(study.trials[0].value, study.trials[4].value)
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("hydra.sweeper.sampler._target_=os.system", "name one of Optuna's samplers"),
        ("hydra.sweeper.direction=[maximize,minimize]", "optimizes one objective"),
    ],
)
def test_optuna_sweeper_refuses_what_it_does_not_do(setting, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna")
    with pytest.raises(KeyError):  # no study was created
        _optuna_app(tmp_path, monkeypatch, lambda cfg: 0.0, setting)
    assert message in capsys.readouterr().err


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
    cfg = _compose_hydra(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "+trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.timeout_min == 240 and launcher.partition == "gpu"
    assert cfg.trainer.strategy == "ddp"
    defaults = _compose_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=1"]).hydra.launcher
    assert (defaults.nodes, defaults.partition) == (1, None)
