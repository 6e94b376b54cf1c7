"""Studies shared by several workers on a real PostgreSQL server (started here, on loopback): a
killed worker's trial is failed by heartbeat and retried, the study gets exactly its n_trials."""

from __future__ import annotations

import csv
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import QUICK, TINY, assert_refused, finetune_cli

optuna = pytest.importorskip("optuna")
from finetune.search.storage import open_storage  # noqa: E402

PASSWORD = "pw-of-finetune-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None  # the real folder, beside pg_isready


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh PostgreSQL server in a temporary folder (loopback only, a password), run
    as `nobody` when the tests run as root (the server refuses root); its URL."""
    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server binaries are missing (apt-get install postgresql; .ci/run does it)")
        pytest.skip("no PostgreSQL server binaries (initdb) here")
    pytest.importorskip("psycopg2")  # the `studies` extra, part of `test`
    root = Path(tempfile.mkdtemp(prefix="finetune-pg-"))  # not under pytest's 0700 folders: `nobody` reads it
    as_user = []
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()
    (root / "pw").write_text(PASSWORD)
    os.chmod(root / "pw", 0o644)
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--no-sync"]
        + ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}"],
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(root / "data"), "-k", str(root), "-p", str(port)]
        + ["-h", "127.0.0.1", "-F", "-c", "max_connections=100"],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 - closed with the server
    )
    try:
        deadline = time.time() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()
            time.sleep(0.5)
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _worker(args, cwd, log):
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def test_an_unreachable_study_database_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("psycopg2")
    url = f"postgresql://me:secret@127.0.0.1:{_free_port()}/studies"  # a closed port
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "-m", "+hparams_search=optuna", f"hydra.sweeper.storage={url}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be opened" in lines[0] and "server is up" in lines[0], proc.stderr
    assert "secret" not in proc.stderr and "me:***@127.0.0.1" in lines[0]
    assert not (tmp_path / "multirun").exists()


def test_finetune_auto_with_an_unreachable_study_database_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("psycopg2")
    url = f"postgresql://me:secret@127.0.0.1:{_free_port()}/studies"
    result = finetune_cli("auto", "data=digits", f"storage={url}", f"out={tmp_path / 'auto'}", timeout=300)
    assert_refused(result, "cannot be opened")
    assert "secret" not in result.stderr


def test_wrong_credentials_or_database_are_one_line_and_exit_2(postgres_url, tmp_path):
    for url, reason in [
        (postgres_url.replace(PASSWORD, "wrong-password"), "password authentication failed"),
        (postgres_url.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
    ]:
        result = finetune_cli("-m", "+hparams_search=optuna", f"hydra.sweeper.storage={url}", timeout=300)
        assert_refused(result, reason)
        assert "wrong-password" not in result.stderr and PASSWORD not in result.stderr


def _open_shared(url: str) -> str:
    open_storage(url, shared=True).engine.dispose()
    return "open"


def test_workers_starting_together_on_a_fresh_database_all_open_it(postgres_url):
    import multiprocessing

    import psycopg2

    connection = psycopg2.connect(postgres_url)
    connection.autocommit = True  # CREATE DATABASE runs outside a transaction
    connection.cursor().execute("CREATE DATABASE fresh")
    connection.close()
    fresh = postgres_url.rsplit("/", 1)[0] + "/fresh"
    with multiprocessing.get_context("spawn").Pool(4) as pool:  # their tables created at the same moment
        assert pool.map(_open_shared, [fresh] * 4) == ["open"] * 4


def test_a_missing_database_driver_names_the_extra(monkeypatch):
    from finetune.errors import ConfigError
    from finetune.search import storage

    monkeypatch.setitem(storage.DRIVERS, "postgresql", ("finetune_no_such_driver", "studies"))
    with pytest.raises(ConfigError, match=r"needs finetune's 'studies' extra: pip install 'finetune\[studies\]'"):
        storage.open_storage("postgresql://me:secret@127.0.0.1/db")
    assert storage.check_driver("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="shared=true"):
        storage.open_storage(None, shared=True)


def _within(seconds: float, call):
    """`call()`'s result, or a failure when it has not returned after `seconds` (a worker waiting
    on a trial that will never finish would otherwise hang the test run: a daemon thread)."""
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive() or not results:
        pytest.fail(f"no result after {seconds} s")
    return results[0]


def _shared_study(url: str, name: str):
    storage = open_storage(url, shared=True, heartbeat=1, grace=2)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(postgres_url):
    """A worker killed between asking for a trial and its first heartbeat leaves it RUNNING with no
    heartbeat (Optuna's stale check skips it): after the grace period it is failed and its copy
    queued, so the study neither waits for it forever nor loses its parameters."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from finetune.search.storage import shared_trials

    space = {"x": FloatDistribution(0.0, 1.0)}
    study = _shared_study(postgres_url, "orphan")
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's, for an ask outside Study.optimize
        orphan = study.ask(space)  # asked, then "killed": no heartbeat, no worker
    first = shared_trials(study, space, 2, 1, 1)  # younger than the grace period: still counted as running
    assert len(first) == 1 and study.get_trials()[orphan.number].state == TrialState.RUNNING
    study.tell(first[0], 1.0)
    time.sleep(2.5)
    again = _within(20, lambda: shared_trials(_shared_study(postgres_url, "orphan"), space, 2, 1, 1))
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL and len(again) == 1
    assert again[0].params == orphan.params and trials[again[0].number].system_attrs["failed_trial"] == orphan.number


def test_workers_wait_for_the_study_lock_before_counting_and_asking(postgres_url):
    """The last free slot cannot go to two workers: counting and asking happen under one PostgreSQL
    advisory lock per study, held here while another worker tries to take a trial."""
    import threading

    from optuna.distributions import FloatDistribution

    from finetune.search.storage import _claiming, shared_trials

    space = {"x": FloatDistribution(0.0, 1.0)}
    holder = _shared_study(postgres_url, "locked")
    taken = []
    with _claiming(holder):
        other = threading.Thread(
            target=lambda: taken.extend(shared_trials(_shared_study(postgres_url, "locked"), space, 1, 1, 1)),
            daemon=True,
        )
        other.start()
        other.join(2.0)
        assert other.is_alive() and not taken  # blocked on the lock
    other.join(30)
    assert not other.is_alive() and len(taken) == 1 and "surplus" not in taken[0].user_attrs
    holder.tell(taken[0].number, 0.5)
    assert shared_trials(holder, space, 1, 1, 1) == []  # the study has its one trial


@pytest.mark.slow  # 3 workers, 12 TINY trials, one worker killed: 60-120 s on 2 busy cores
def test_workers_share_a_study_and_a_killed_workers_trial_is_retried(postgres_url, image_folder, tmp_path):
    n_trials = 12
    args = [
        "-m",
        "+hparams_search=optuna",
        "+recipe=freeze_all_but_head",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.shared=true",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=8",
        "hydra.sweep.dir=sweep",
    ]
    storage = open_storage(postgres_url)  # its tables, before three workers would create them at once
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(3)]  # noqa: SIM115
    workers = [_worker(args, tmp_path, log) for log in logs]
    victim, killed = workers[0], None
    try:
        deadline = time.time() + 240
        while killed is None and time.time() < deadline and victim.poll() is None:
            try:
                study = optuna.load_study(study_name="shared", storage=storage)
            except KeyError:  # not created yet
                time.sleep(0.5)
                continue
            mine = [
                t
                for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
            ]
            if mine:
                time.sleep(1.0)  # into its run
                victim.send_signal(signal.SIGKILL)
                killed = mine[0].number
            time.sleep(0.2)
        assert killed is not None, (tmp_path / "worker0.log").read_text()[-3000:]
        codes = [w.wait(timeout=max(1, deadline - time.time())) for w in workers[1:]]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text()[-3000:] for i in (1, 2)]

    study = optuna.load_study(study_name="shared", storage=storage)
    by_number = {t.number: t for t in study.trials}
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n_trials
    assert by_number[killed].state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state.name for t in retries] == ["COMPLETE"] and retries[0].params == by_number[killed].params
    others = [t for t in study.trials if t.state.name == "FAIL" and t.number != killed]
    assert others == []  # no other trial failed: under the study's lock no two workers take the last slot
    workers_seen = {t.user_attrs["worker"] for t in finished}
    assert len(workers_seen) >= 2

    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert sorted(int(r["job"]) for r in rows if r["status"] == "completed") == sorted(t.number for t in finished)
    for row in rows:
        trial = by_number[int(row["job"])]
        assert float(row["val/acc"]) == pytest.approx(trial.value)


@pytest.mark.slow  # two auto workers of 90 s, one killed mid-trial: ~150 s
def test_auto_workers_share_a_study_and_a_killed_workers_trial_is_retried(postgres_url, image_folder, tmp_path):
    study_name = "auto_shared"
    args = [
        "auto",
        "auto.backbones=[test_resnet]",
        "auto.top=1",
        "auto.folds=2",
        "auto.recipes=[freeze_all_but_head]",
        "backbone.weights=random",
        "data.image_size=32",
        "data.num_workers=0",
        "logger=none",
        "trainer.max_epochs=3",
        "data=folder",
        f"data.root={image_folder}",
        f"storage={postgres_url}",
        f"study_name={study_name}",
    ]
    storage = open_storage(postgres_url)
    logs = [open(tmp_path / f"auto{i}.log", "w") for i in range(2)]  # noqa: SIM115
    workers = [_worker([*args, f"out={tmp_path / f'out{i}'}", "time_budget=90s"], tmp_path, logs[i]) for i in range(2)]
    victim, killed = workers[0], None
    try:
        deadline = time.time() + 180
        while killed is None and time.time() < deadline and victim.poll() is None:
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:
                time.sleep(0.5)
                continue
            mine = [
                t
                for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and t.user_attrs.get("folder")
            ]
            if mine:  # its config made, its run started
                victim.send_signal(signal.SIGKILL)
                killed = mine[0].number
            time.sleep(0.2)
        assert killed is not None, (tmp_path / "auto0.log").read_text()[-3000:]
        code = workers[1].wait(timeout=max(1, deadline - time.time()))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for log in logs:
            log.close()
    assert code == 0, (tmp_path / "auto1.log").read_text()[-3000:]
    study = optuna.load_study(study_name=study_name, storage=storage)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed].state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    assert retries[0].params == by_number[killed].params
    rows = list(csv.DictReader((tmp_path / "out1" / "leaderboard.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in study.trials if t.state.name != "WAITING")
    assert (tmp_path / "out1" / "best.ckpt").is_file()
