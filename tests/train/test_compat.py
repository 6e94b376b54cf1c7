"""The Lightning internals finetune relies on (finetune/train/compat.py) are still there and still
behave: each private name imported and checked, each compat function run once for real.

A failure here after a Lightning upgrade names the version and what moved; fix compat.py."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import lightning as L
import pytest

from finetune.train.compat import process_launch, take_children_from_observers

VERSION = L.__version__


def private(module: str, name: str):
    """`module`.`name`, or a failure that says which Lightning lost it."""
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"Lightning {VERSION}: cannot import {module} ({err}); finetune/train/compat.py needs it.")
    assert hasattr(found, name), f"Lightning {VERSION}: {module}.{name} is gone; finetune/train/compat.py needs it."
    return getattr(found, name)


def parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_the_private_names_compat_uses_still_exist():
    script = private("lightning.pytorch.strategies.launchers.subprocess_script", "_SubprocessScriptLauncher")
    assert "cluster_environment" in parameters(script.__init__), (
        f"Lightning {VERSION}: _SubprocessScriptLauncher no longer takes a cluster_environment."
    )
    private("lightning.pytorch.strategies.launchers.multiprocessing", "_MultiProcessingLauncher")
    observer = private("lightning.fabric.strategies.launchers.subprocess_script", "_ChildProcessObserver")
    assert {"main_pid", "child_processes", "sleep_period"} <= parameters(observer.__init__), (
        f"Lightning {VERSION}: _ChildProcessObserver's constructor changed: {parameters(observer.__init__)}."
    )
    # The launcher still hands its children to that observer (not to a successor we do not retire).
    launching = inspect.getsource(
        private("lightning.pytorch.strategies.launchers.subprocess_script", "_SubprocessScriptLauncher").launch
    )
    assert "_launch_process_observer" in launching, (
        f"Lightning {VERSION}: the ddp launcher no longer starts _ChildProcessObserver; check "
        f"take_children_from_observers."
    )


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_process_launch_tells_the_launchers_apart(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_launch(trainer(devices=1)) is None
    assert process_launch(trainer(devices=2, strategy="ddp")) == "script", (
        f"Lightning {VERSION}: strategy=ddp no longer uses _SubprocessScriptLauncher."
    )
    assert process_launch(trainer(devices=2, strategy="ddp_spawn")) == "workers", (
        f"Lightning {VERSION}: strategy=ddp_spawn no longer uses _MultiProcessingLauncher."
    )
    monkeypatch.setenv("LOCAL_RANK", "0")  # Lightning's sign that a launcher (torchrun) made the processes
    assert process_launch(trainer(devices=2, strategy="ddp")) == "external", (
        f"Lightning {VERSION}: cluster_environment.creates_processes_externally no longer reads LOCAL_RANK."
    )


def test_taking_its_children_retires_the_observer_thread():
    observer_class = private("lightning.fabric.strategies.launchers.subprocess_script", "_ChildProcessObserver")
    # The child exits 0 whatever happens (when its stdin closes): an observer still watching it
    # then ends quietly instead of killing this process.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    observer = observer_class(main_pid=os.getpid(), child_processes=[child], sleep_period=0.05)
    observer.start()
    try:
        taken = take_children_from_observers()
        observer.join(timeout=10)
        assert taken == [child], f"Lightning {VERSION}: no _child_processes taken from the observer."
        assert not observer.is_alive() and child.poll() is None, (
            f"Lightning {VERSION}: the observer did not end once its _child_processes list was empty."
        )
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        observer.join(timeout=10)
    assert take_children_from_observers() == []


def test_wandb_logger_init_arguments_hold_anonymous_and_drop_it(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from finetune.train.compat import drop_wandb_anonymous

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" in getattr(logger, "_wandb_init", {}), (
        f"Lightning {VERSION}: WandbLogger._wandb_init no longer holds 'anonymous'; drop_wandb_anonymous needs a look"
    )
    drop_wandb_anonymous(logger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["dir"] == str(tmp_path)
