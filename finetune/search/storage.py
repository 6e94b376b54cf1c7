"""Where an Optuna study lives, and a study that several workers share.

``hydra.sweeper.storage=postgresql://USER:PASSWORD@HOST/DB`` lets several ``finetune -m`` processes
(on several machines) join one study: the same ``study_name`` loads it. With
``hydra.sweeper.shared=true`` each worker records a heartbeat for the trials it runs every
``heartbeat_interval`` seconds; a trial whose heartbeat is older than ``grace_period`` (its worker
was killed) is told FAIL by the next worker that looks, and Optuna's retry callback queues a copy
of it (same parameters, system attr ``failed_trial``), up to ``max_retry`` times. ``n_trials`` then
counts the study's finished (COMPLETE or PRUNED) trials, whichever worker ran them.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune.errors import ConfigError

# URL scheme (before any +driver) -> (module, pip extra) of its database driver.
DRIVERS = {"postgresql": ("psycopg2", "studies"), "postgres": ("psycopg2", "studies")}
# First key of the PostgreSQL advisory lock a shared study is claimed under (the second: its id).
_LOCK_SPACE = 0x66746E  # "ftn"


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))


def check_driver(url: str) -> str:
    """`url` with its database driver named (``postgresql://`` -> ``postgresql+psycopg2://``: SQLAlchemy
    2.1 would pick psycopg 3 by itself); a ConfigError naming the extra when the driver is missing."""
    import importlib.util

    scheme, sep, rest = str(url).partition("://")
    module, extra = DRIVERS.get(scheme, (None, None))
    if module is None:
        return str(url)
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"storage={hide_password(url)} needs finetune's {extra!r} extra: pip install 'finetune[{extra}]'."
        )
    return f"postgresql+{module}{sep}{rest}"


def open_storage(
    url: str | None, shared: bool = False, heartbeat: int = 10, grace: int | None = None, retries: int = 3
):
    """The Optuna storage for `url` (None: in memory). `shared`: an RDBStorage whose trials send
    heartbeats, their stale ones told FAIL and retried. A database that cannot be reached, or
    refuses the credentials, is a ConfigError of one line."""
    import optuna
    import sqlalchemy.exc

    if url is None:
        if shared:
            raise ConfigError("hydra.sweeper.shared=true: the workers share a study in a database; set storage=URL.")
        return None
    full = check_driver(url)
    kwargs: dict[str, Any] = {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
    if shared:
        new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # Optuna 4.9+
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback if new else optuna.storages.RetryFailedTrialCallback
        kwargs = {
            "heartbeat_interval": int(heartbeat),
            "grace_period": int(grace) if grace else 2 * int(heartbeat),
            "heartbeat_stale_trial_callback" if new else "failed_trial_callback": retry(max_retry=int(retries)),
        }
    try:
        return _rdb_storage(full, kwargs)
    except ImportError as err:
        raise ConfigError(
            f"storage={hide_password(url)}: its database driver is missing ({err.__cause__ or err})."
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())[:300]
        raise ConfigError(
            f"storage={hide_password(url)}: the study's database cannot be opened ({reason}). Check that its "
            "server is up and reachable from here, and the user, password and database name in the URL."
        ) from None


def _rdb_storage(url: str, kwargs: dict[str, Any]):
    """An RDBStorage; workers that start together on a fresh database race to create its tables:
    the loser tries again (a server that cannot be reached fails at once)."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)


def _engine_kwargs(url: str) -> dict[str, Any]:
    """A connection that gives up after 10 s (a server that never answers is an error, not a hang)."""
    if str(url).startswith(("postgresql", "postgres")):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def shared_trials(study: Any, distributions: dict[str, Any], n_trials: int, n_jobs: int, interval: int) -> list[Any]:
    """Up to `n_jobs` new trials of a shared `study` (its killed workers' trials failed and queued
    again first), none once it holds `n_trials` COMPLETE or PRUNED trials. While the last trials
    run elsewhere it waits for them, or for their failure. Each keeps its worker (user attr).

    The count and the asking happen under the study's lock (PostgreSQL), so two workers never
    take the same last slot; without one (SQLite) the later of two such trials is told FAIL with
    user attr ``surplus``."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    while True:
        with _claiming(study):
            fail_dead_trials(study)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            done = sum(s in finished for s in states)
            if done >= n_trials:
                return []
            free = n_trials - done - states.count(TrialState.RUNNING)
            trials = []
            for _ in range(min(n_jobs, free)):
                trial = _claim(study, distributions, n_trials)
                if trial is None:  # the study is full after all: ask no more
                    break
                trials.append(trial)
        if trials:
            return trials
        time.sleep(interval)


def _claim(study: Any, distributions: dict[str, Any], n_trials: int) -> Any:
    """A new trial with its first heartbeat and this worker's name; None (told FAIL, ``surplus``)
    when trials numbered below it already fill the study (a worker without the lock asked too)."""
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask(distributions)
    study._storage.record_heartbeat(trial._trial_id)  # from now on a kill fails it
    counted = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    if sum(t.number < trial.number for t in counted) >= n_trials:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("worker", worker_name())  # claimed: see fail_dead_trials
    return trial


def fail_dead_trials(study: Any) -> None:
    """Fail the trials of killed workers and queue their copies (the storage's retry callback):
    Optuna's heartbeat check for those with a stale heartbeat, and here those never claimed — a
    worker killed between asking for a trial and its first heartbeat leaves it RUNNING with no
    heartbeat, which Optuna's check never looks at, and the study would wait for it forever."""
    import copy
    import datetime

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # heartbeats are "meant for Study.optimize"; ask and tell use them as well
        warnings.simplefilter("ignore")
        fail_stale_trials(study)
    backend = _backend(study)
    interval = backend.get_heartbeat_interval() if hasattr(backend, "get_heartbeat_interval") else None
    if not interval:
        return
    grace = datetime.timedelta(seconds=getattr(backend, "grace_period", None) or 2 * interval)
    now = datetime.datetime.now()  # Optuna stamps datetime_start with the asking host's local time
    retry = backend.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" in trial.user_attrs or trial.datetime_start is None or now - trial.datetime_start < grace:
            continue
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker failed it first
            continue
        if failed and retry is not None:
            retry(study, copy.deepcopy(study._storage.get_trial(trial._trial_id)))


@contextmanager
def _claiming(study: Any) -> Iterator[None]:
    """The study's lock while held: a PostgreSQL session advisory lock, which the server releases
    when the holder's connection ends (a killed worker cannot keep it). Other databases: none."""
    backend = _backend(study)
    engine = getattr(backend, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    import sqlalchemy

    key = {"space": _LOCK_SPACE, "study": int(study._study_id)}
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:space, :study)"), key)
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:space, :study)"), key)


def _backend(study: Any) -> Any:
    """The study's RDBStorage (Optuna puts a cache in front of it)."""
    return getattr(study._storage, "_backend", study._storage)


def worker_name() -> str:
    """``host:pid`` of this process, kept with each trial it runs (user attr ``worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeats:
    """A thread recording the heartbeat of `trials` every interval while the ``with`` block runs
    (their jobs run in this process); without heartbeats on the storage, nothing."""

    def __init__(self, study: Any, trials: list[Any]):
        storage = study._storage  # a cache in front of the RDBStorage: it asks the RDBStorage
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.storage, self.interval = storage, interval
        self.ids = [t._trial_id for t in trials]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="finetune-heartbeat")

    def _beat(self) -> None:
        while True:
            for trial_id in self.ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat; the next one may get through
                    pass
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeats:
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.interval:
            self.stop.set()
            self.thread.join()
