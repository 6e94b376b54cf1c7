"""logger=mlflow against a real MLflow tracking server on loopback, logger=tensorboard read back
from its event files; an unreachable server or a missing package never stops a run unexplained."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import QUICK, QUICK_WITH_PICTURES, TINY

from finetune import fit
from finetune.errors import ConfigError
from finetune.train.loggers import build_loggers
from finetune.train.tracking import GROUP_TAG, flat_params, store_folder

mlflow = pytest.importorskip("mlflow")  # the `loggers` extra, part of `test`
MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite store, artifacts proxied), up once /health answers."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    args = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "art")]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 180 s"
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.tracking.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id])


@pytest.mark.slow  # a tracking server process and a 2-epoch run: 30-60 s on 2 busy cores
def test_mlflow_run_has_params_epoch_metrics_and_the_best_checkpoint(mlflow_server, image_folder, tmp_path, capsys):
    result = fit(
        overrides=TINY
        + QUICK
        + ["data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}/run", "trainer.max_epochs=2"]
        + ["logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", "logger.mlflow.experiment=one"]
    )
    (run,) = _runs(mlflow_server, "one")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["backbone.name"] == "test_resnet"
    assert run.data.params["trainer.max_epochs"] == "2"
    client = mlflow.tracking.MlflowClient(mlflow_server)
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 2, (name, history)  # one value per epoch
    assert run.data.metrics["best/val/acc"] == pytest.approx(result.metrics["val/acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best")] == [
        "best/aliases.txt",
        "best/best.ckpt",
        "best/metadata.yaml",
    ]
    downloaded = Path(client.download_artifacts(run.info.run_id, "best/best.ckpt", str(tmp_path)))
    assert downloaded.read_bytes() == result.best_checkpoint.read_bytes()
    assert "mlflow" not in result.outputs  # a server's store: nothing on this disk to point at
    assert "View run" not in capsys.readouterr().out  # MLflow's own prints stay in finetune.log


@pytest.mark.slow  # a CLI sweep of 3 trials: 30-60 s on 2 busy cores
def test_a_sweep_logs_one_mlflow_run_per_trial_tagged_with_the_sweep(mlflow_server, image_folder, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}  # the environment's server is respected
    args = [*TINY, *QUICK, "data=folder", f"data.root={image_folder}", "logger=mlflow"]
    args += ["logger.mlflow.experiment=sweep", "seed=1,2,3", "hydra.sweep.dir=sweep", "data.batch_size=8"]
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(mlflow_server, "sweep")
    assert sorted(r.info.run_name for r in runs) == ["job 0", "job 1", "job 2"]
    by_job = {r.info.run_name: r.data.tags["finetune.overrides"].split() for r in runs}
    assert [f"seed={n}" in by_job[f"job {n - 1}"] for n in (1, 2, 3)] == [True, True, True]
    assert {r.data.tags[GROUP_TAG] for r in runs} == {str((tmp_path / "sweep").resolve())}
    assert all(r.info.status == "FINISHED" and "val/acc" in r.data.metrics for r in runs)
    for chatter in ("View run", "View experiment", "database tables", "Warning", "warning:"):
        assert chatter not in proc.stdout + proc.stderr, chatter  # MLflow's own lines stay in finetune.log


@pytest.mark.slow  # two short runs against the server: 30-60 s on 2 busy cores
def test_a_resumed_run_continues_its_mlflow_run_and_uploads_its_pictures(mlflow_server, image_folder, tmp_path):
    args = [*TINY, *QUICK_WITH_PICTURES, "data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}/run"]
    args += ["logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", "logger.mlflow.experiment=resumed"]
    first = fit(overrides=args)
    (run,) = _runs(mlflow_server, "resumed")
    client = mlflow.tracking.MlflowClient(mlflow_server)
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "viz")}
    assert {f"viz/{p.name}" for p in (tmp_path / "run" / "viz").glob("*.png")} == pictures
    assert "viz/curves.png" in pictures and "viz/confusion.png" in pictures

    second = fit(overrides=[*args, "resume=true", "trainer.max_epochs=2"])
    assert [r.info.run_id for r in _runs(mlflow_server, "resumed")] == [run.info.run_id]  # one run, continued
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.value for m in history] == pytest.approx([first.history[0]["val/acc"], second.history[1]["val/acc"]])
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_without_a_tracking_uri_the_store_is_local_under_the_run(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (logger,) = build_loggers({"mlflow": {"experiment": "local"}}, tmp_path / "run", {"optimizer": {"lr": 0.1}})
    assert store_folder(logger) == (tmp_path / "run" / "mlruns").resolve()
    run = logger.experiment.get_run(logger.run_id)
    assert run.data.params == {"optimizer.lr": "0.1"}
    experiment = logger.experiment.get_experiment(logger.experiment_id)
    assert experiment.artifact_location == (tmp_path / "run" / "mlruns" / "artifacts").resolve().as_uri()
    assert not (tmp_path / "mlruns").exists()  # nothing in the working directory


def test_an_unreachable_mlflow_server_is_one_warning_and_the_run_goes_on(caplog, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        loggers = build_loggers({"csv": True, "mlflow": {"tracking_uri": uri}}, tmp_path, {})
    assert time.perf_counter() - start < 10
    assert [type(logger).__name__ for logger in loggers] == ["EpochCSVLogger"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0] and "no run logged" in warnings[0], warnings
    assert "ConnectionRefusedError" in warnings[0] and "\n" not in warnings[0]


def test_a_store_mlflow_refuses_is_the_same_one_line(caplog, tmp_path):
    uri = f"file:{tmp_path}/mlruns"  # MLflow 3 refuses its old folder store
    with caplog.at_level(logging.WARNING):
        assert build_loggers({"mlflow": {"tracking_uri": uri}}, tmp_path, {}) == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert uri in warning and "MlflowException" in warning and "\n" not in warning


def test_tensorboard_event_files_hold_the_epoch_metrics_and_hparams(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(
        overrides=TINY
        + QUICK_WITH_PICTURES
        + ["data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}/run", "trainer.max_epochs=2"]
        + ["logger=tensorboard"]
        + ["viz.max_images=8"]
    )
    assert result.outputs["tensorboard"] == tmp_path / "run" / "tensorboard"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        values = [e.value for e in events.Scalars(name)]
        assert len(values) == 2, (name, values)  # one value per epoch
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([h["val/acc"] for h in result.history])
    assert events.Scalars("best/val/acc")[0].value == pytest.approx(result.metrics["val/acc"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HPARAMS tab
    drawn = {f"viz/{p.stem}" for p in (tmp_path / "run" / "viz").glob("*.png")}
    assert "viz/curves" in drawn and set(events.Tags()["images"]) == drawn  # the IMAGES tab
    assert events.Images("viz/curves")[0].width > 100


def test_flat_params_are_dotted_keys_with_plain_values():
    params = flat_params({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "head": {}, "seed": 3, "x": None})
    assert params == {"optimizer.lr": 0.1, "optimizer.betas": "[0.9, 0.99]", "head": "{}", "seed": 3, "x": "None"}


@pytest.mark.parametrize("logger", ["mlflow", "tensorboard"])
def test_a_missing_loggers_extra_is_one_line_with_the_pip_command(logger, monkeypatch):
    from finetune.commands.preflight import check_overrides

    monkeypatch.setitem(sys.modules, logger, None)  # as if not installed: find_spec gives None
    with pytest.raises(
        ConfigError, match=r"logger=.* needs finetune's 'loggers' extra: pip install 'finetune\[loggers\]'"
    ):
        check_overrides([f"logger={logger}"])
