"""Runs that survive: kill -9 and resume parity, atomic checkpoints, NaN and out-of-memory faults.

The parity run is the real CLI in a subprocess, killed with SIGKILL after a chosen step by a
test-only patch (the driver below), then resumed with ``resume=true``; an uninterrupted run of the
same config runs in this process meanwhile. Digits, the tiny ``test_resnet``, 4 steps per epoch,
3 epochs: the kill lands mid-epoch 2, which is also the epoch gradual unfreezing opens stage4, with
head dropout (torch's generator), a step LR schedule after a per-step warm-up, RandAugment and
random erasing (albumentations' generator), mixup/cutmix (numpy's), stochastic depth and an EMA of
the weights (state in last.ckpt) in play.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TINY

from finetune import fit
from finetune.errors import ConfigError, NonFiniteLossError, OutOfMemoryError
from finetune.train import checkpoints
from finetune.train.checkpoints import LAST, RUN_KEY, atomic_save
from finetune.train.module import ClassifierModule

RUN = [
    "+recipe=gradual_unfreeze",
    *TINY,
    *[o for o in QUICK if o != "logger=none"],
    "logger=csv",
    "trainer.max_epochs=3",
    "data.batch_size=16",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "head.dropout=0.3",
    "optimizer.lr=0.1",
    "scheduler.step_size=1",
    "scheduler.gamma=0.5",
    "callbacks.checkpoint.min_write_interval_s=0",  # last.ckpt at every epoch end, however short
    "augment=randaugment",
    "mixup.alpha=0.4",
    "cutmix.alpha=1.0",
    "loss.label_smoothing=0.1",
    "ema.decay=0.9",
    "backbone.drop_path_rate=0.1",
    "scheduler.warmup_epochs=0.5",
    "scheduler.interval=step",
]
KILL_AFTER_STEP = 6  # global step 6 of 12: epoch 2 of 3 (0-based 1), its second batch

# The real CLI, with a test-only hook: SIGKILL its own process after optimizer step K.
DRIVER = """
import os, signal, sys
from finetune.train.module import ClassifierModule
k = int(os.environ["KILL_AFTER_STEP"])
batch_end = ClassifierModule.on_train_batch_end
def kill(self, outputs, batch, batch_idx):
    batch_end(self, outputs, batch, batch_idx)
    if self.global_step == k:
        os.kill(os.getpid(), signal.SIGKILL)
ClassifierModule.on_train_batch_end = kill
from finetune.cli import main
sys.argv = ["finetune", *sys.argv[1:]]
main()
"""


def cli(*args: str, cwd: Path, kill_after: int | None = None, wait: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if kill_after is None:
        command = [sys.executable, "-m", "finetune", *args]
    else:
        command = [sys.executable, "-c", DRIVER, *args]
        env["KILL_AFTER_STEP"] = str(kill_after)
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """(uninterrupted run dir, killed-then-resumed run dir, the killed run's last.ckpt as it was,
    a CLI run asked to resume from an empty folder)."""
    root = tmp_path_factory.mktemp("resume")
    killed = cli(*RUN, "hydra.run.dir=b", cwd=root, kill_after=KILL_AFTER_STEP, wait=False)
    nothing = cli(*RUN, "hydra.run.dir=empty", "resume=true", cwd=root, wait=False)
    fit(overrides=RUN + [f"hydra.run.dir={root / 'a'}"])  # meanwhile, the uninterrupted run
    out, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    last = root / "b" / "checkpoints" / LAST
    at_kill = torch.load(last, map_location="cpu", weights_only=True)
    assert not (root / "b" / "summary.json").exists()

    resumed = cli(*RUN, "hydra.run.dir=b", "resume=true", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in (root / "b" / "finetune.log").read_text()  # Lightning's line, in the run's log
    nothing_out, nothing_err = nothing.communicate(timeout=600)
    return root / "a", root / "b", at_kill, (nothing.returncode, nothing_err, root / "empty")


@pytest.mark.slow  # the kill -9 fixture (4 runs); fast: test_freeze.py resumes across the unfreeze epoch
def test_killed_run_resumes_to_the_same_weights_and_metrics(killed_and_resumed):
    uninterrupted, resumed, at_kill, _ = killed_and_resumed
    # The kill came mid-epoch: the checkpoint it left is the end of the first epoch.
    assert at_kill["epoch"] == 0 and at_kill["global_step"] == 4

    a, b = weights(uninterrupted / "checkpoints" / LAST), weights(resumed / "checkpoints" / LAST)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # With EMA, state_dict holds the averaged weights; the training weights and the count go beside them.
    full_a, full_b = (
        torch.load(d / "checkpoints" / LAST, map_location="cpu", weights_only=True) for d in (uninterrupted, resumed)
    )
    current_a, current_b = full_a["current_model_state"], full_b["current_model_state"]
    assert all(torch.equal(current_a[k], current_b[k]) for k in current_a)
    assert not all(torch.equal(current_a[k], a[k]) for k in a)  # the average is not the training weights
    assert int(full_b["averaging_state"]["n_averaged"]) == int(full_a["averaging_state"]["n_averaged"]) == 12
    # Some weights moved since the kill: the comparison is not between two copies of one file.
    assert not all(torch.equal(b[k], at_kill["state_dict"][k]) for k in b)

    summary_a = json.loads((uninterrupted / "summary.json").read_text())
    summary_b = json.loads((resumed / "summary.json").read_text())
    assert len(summary_b["history"]) == 3  # the epoch before the kill is reported too
    assert summary_b["history"] == summary_a["history"]  # every metric, every epoch, bit for bit
    assert summary_b["metrics"] == summary_a["metrics"]
    # Unfreezing went on from where it was: stage4 opened in epoch 2, stage3 in epoch 3.
    assert [row["unfrozen_groups"] for row in summary_b["history"]] == [0.0, 1.0, 2.0]
    # metrics.csv holds every epoch once, the one finished before the kill included
    rows_a, rows_b = csv_rows(uninterrupted), csv_rows(resumed)
    assert [row["epoch"] for row in rows_b] == ["1", "2", "3"]  # one row per epoch, counted from 1
    assert rows_b == rows_a


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_csv_keeps_the_finished_epochs_and_drops_the_ones_to_redo(tmp_path):
    from finetune.train.loggers import build_loggers

    folder = tmp_path / "csv"
    folder.mkdir()
    # a paced run killed in epoch 5: its last.ckpt is from the end of epoch 2, rows reach epoch 4
    rows = [{"epoch": e + 1, "step": 4 * e + 3, "val/acc": 0.5 + e / 10, "note": "x"} for e in range(4)]
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "note", "step", "val/acc"])
        writer.writeheader()
        writer.writerows(rows)
    [logger] = build_loggers({"csv": True}, tmp_path, {}, keep_csv_through_epoch=2)
    kept = csv_rows(tmp_path)  # on disk before the resumed run logs anything
    assert [(r["epoch"], r["step"], float(r["val/acc"]), r["note"]) for r in kept] == [
        ("1", "3", 0.5, "x"),
        ("2", "7", 0.6, "x"),
    ]
    logger.log_metrics({"val/acc": 0.9, "epoch": 3}, step=11)
    logger.log_metrics({"train/loss": 0.2, "epoch": 3}, step=11)  # the epoch's second call: the same row
    logger.save()
    assert [(r["epoch"], r["val/acc"], r["train/loss"]) for r in csv_rows(tmp_path)] == [
        ("1", "0.5", ""),
        ("2", "0.6", ""),
        ("3", "0.9", "0.2"),
    ]

    [fresh] = build_loggers({"csv": True}, tmp_path, {})  # a new run in the same folder starts afresh
    assert csv_rows(tmp_path) == []
    fresh.log_metrics({"val/acc": 0.1, "epoch": 1}, step=3)
    fresh.save()
    assert [(r["epoch"], r["val/acc"]) for r in csv_rows(tmp_path)] == [("1", "0.1")]


@pytest.mark.slow  # the kill -9 fixture (4 runs); fast: test_freeze.py resumes across the unfreeze epoch
def test_resumed_run_keeps_its_wandb_id_and_optimizer_state(killed_and_resumed):
    _, resumed, at_kill, _ = killed_and_resumed
    final = torch.load(resumed / "checkpoints" / LAST, map_location="cpu", weights_only=True)
    assert final[RUN_KEY]["wandb_id"] == at_kill[RUN_KEY]["wandb_id"]
    assert final["epoch"] == 2 and final["global_step"] == 12
    assert final["lr_schedulers"][0]["last_epoch"] == 12  # stepped after every optimizer step (interval=step)
    assert final["optimizer_states"][0]["state"]  # momentum buffers came along


@pytest.mark.slow  # the kill -9 fixture (4 runs); fast: test_freeze.py resumes across the unfreeze epoch
def test_resume_from_a_checkpoint_path_with_the_notebook_api(killed_and_resumed, tmp_path):
    uninterrupted, resumed, _, _ = killed_and_resumed
    # Continue the finished 3-epoch run for a 4th epoch, into a new folder.
    result = fit(
        overrides=RUN
        + [
            f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}",
            "trainer.max_epochs=4",
            f"hydra.run.dir={tmp_path / 'more'}",
        ]
    )
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.history[:3] == json.loads((uninterrupted / "summary.json").read_text())["history"]


@pytest.mark.slow  # the kill -9 fixture (4 runs); fast: test_freeze.py resumes across the unfreeze epoch
def test_nothing_to_resume_is_an_error_not_a_fresh_start(killed_and_resumed, tmp_path):
    returncode, stderr, empty = killed_and_resumed[3]
    assert returncode == 2, stderr[-2000:]
    assert "nothing to resume" in stderr and "hydra.run.dir" in stderr and "Traceback" not in stderr
    assert not (empty / "checkpoints").exists()

    with pytest.raises(ConfigError, match="does not exist: nothing to resume"):
        fit(overrides=RUN + [f"ckpt_path={tmp_path}/no.ckpt", f"hydra.run.dir={tmp_path}/x"])
    with pytest.raises(ConfigError, match="resume='maybe': it must be true or false"):
        fit(overrides=RUN + ["resume=maybe", f"hydra.run.dir={tmp_path}/y"])


@pytest.mark.slow  # the kill -9 fixture (4 runs); fast: test_freeze.py resumes across the unfreeze epoch
def test_resume_with_a_different_model_is_refused(killed_and_resumed, tmp_path):
    _, resumed, _, _ = killed_and_resumed
    last = resumed / "checkpoints" / LAST
    with pytest.raises(ConfigError, match=r"head=.*hidden.*this run"):
        fit(overrides=RUN + [f"ckpt_path={last}", "head=mlp", f"hydra.run.dir={tmp_path}/x"])
    not_a_run = tmp_path / "weights.pt"
    torch.save({"state_dict": weights(last)}, not_a_run)
    with pytest.raises(ConfigError, match="not a finetune training checkpoint"):
        fit(overrides=RUN + [f"ckpt_path={not_a_run}", f"hydra.run.dir={tmp_path}/y"])


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / LAST
    atomic_save({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # what a process killed mid-write leaves behind
        raise OSError("No space left on device")

    monkeypatch.setattr("finetune.train.checkpoints.torch.save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.undo()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == [LAST]  # no temporary file left behind


@pytest.mark.parametrize("interval", [0, 3600], ids=["written-every-epoch", "held-in-memory"])
def test_nan_keeps_the_last_good_checkpoint_and_says_where(tmp_path, monkeypatch, interval):
    batch_end = ClassifierModule.on_train_batch_end

    def poison(self, outputs, batch, batch_idx):  # the weights blow up during the second epoch
        batch_end(self, outputs, batch, batch_idx)
        if self.global_step == 5:
            with torch.no_grad():
                next(self.model.head.parameters()).fill_(float("nan"))

    monkeypatch.setattr(ClassifierModule, "on_train_batch_end", poison)
    with pytest.raises(NonFiniteLossError) as caught:  # held in memory: the failure writes it
        fit(overrides=RUN + [f"callbacks.checkpoint.min_write_interval_s={interval}", f"hydra.run.dir={tmp_path}/run"])
    last = tmp_path / "run" / "checkpoints" / LAST
    message = str(caught.value)
    assert "step 6" in message and "optimizer.lr" in message
    assert f"The last good checkpoint is kept: {last} (end of epoch 1)" in message
    kept = torch.load(last, map_location="cpu", weights_only=True)
    assert kept["epoch"] == 0 and all(
        torch.isfinite(t).all() for t in kept["state_dict"].values() if t.is_floating_point()
    )


def test_paced_checkpoints_are_written_once_and_equal_those_of_every_epoch(tmp_path, monkeypatch):
    """min_write_interval_s longer than the run: every epoch's checkpoints wait in memory, and the
    end of training writes best.ckpt and last.ckpt once each, identical to a run writing them at
    every epoch end (same seed: the same weights, bit for bit)."""
    writes = []
    save = checkpoints.atomic_save

    def counted(obj, path):
        writes.append((Path(path).name, obj["epoch"]))
        save(obj, path)

    every_epoch = fit(overrides=RUN + [f"hydra.run.dir={tmp_path}/every"])
    monkeypatch.setattr(checkpoints, "atomic_save", counted)
    paced = fit(overrides=RUN + ["callbacks.checkpoint.min_write_interval_s=3600", f"hydra.run.dir={tmp_path}/paced"])
    best_epoch = int(paced.metrics["epoch"]) - 1  # checkpoints keep Lightning's 0-based epoch
    assert sorted(writes) == [("best.ckpt", best_epoch), (LAST, 2)]
    assert paced.history == every_epoch.history
    for name in ("best.ckpt", LAST):
        a = torch.load(every_epoch.output_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        b = torch.load(paced.output_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        assert a["callbacks"].keys() == b["callbacks"].keys()


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 8589934592 bytes."
        ),
    ],
)
def test_out_of_memory_names_the_batch_size_to_try(tmp_path, monkeypatch, error):
    def too_big(self, batch, batch_idx):
        raise error

    monkeypatch.setattr(ClassifierModule, "training_step", too_big)
    with pytest.raises(OutOfMemoryError) as caught:
        fit(overrides=RUN + [f"hydra.run.dir={tmp_path}/run"])
    message = str(caught.value)
    assert "data.batch_size=8 (half of 16)" in message and str(error).splitlines()[0] in message


def test_unrelated_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    def broken(self, batch, batch_idx):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ClassifierModule, "training_step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fit(overrides=RUN + [f"hydra.run.dir={tmp_path}/run"])


@pytest.mark.slow  # three CLI runs, about 40 s on 2 cores
def test_cli_resume_in_a_new_process_with_dataloader_workers_is_exact(tmp_path):
    """A resumed run makes its first training iterator before Lightning's set_epoch, and worker
    processes prefetch indices at once: the sampler must already be at the resumed epoch (it read
    epoch 0's order here, and epoch 2 of the resumed digits run came out different)."""
    args = [
        "+recipe=full_finetune",
        *TINY,
        "data.num_workers=2",
        "logger=csv",
        "viz=none",
        "seed=0",
        "callbacks.progress_bar=false",
        "callbacks.checkpoint.min_write_interval_s=0",
    ]
    whole = cli(*args, "trainer.max_epochs=2", "hydra.run.dir=whole", cwd=tmp_path)
    first = cli(*args, "trainer.max_epochs=1", "hydra.run.dir=first", cwd=tmp_path)
    assert whole.returncode == 0 and first.returncode == 0, (whole.stderr + first.stderr)[-3000:]
    resumed = cli(
        *args,
        "trainer.max_epochs=2",
        f"ckpt_path={tmp_path / 'first' / 'checkpoints' / LAST}",
        "hydra.run.dir=resumed",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = [json.loads((tmp_path / d / "summary.json").read_text())["history"] for d in ("whole", "resumed")]
    assert history[1] == history[0]  # every metric of both epochs, bit for bit


@pytest.mark.slow  # two CLI runs, one killed
@pytest.mark.parametrize("recipe, kill_after", [("lp_ft", 6), ("freeze_all_but_head", 2)])
def test_lp_ft_and_the_lbfgs_head_resume_bit_exact_after_a_kill(tmp_path, image_folder, recipe, kill_after):
    """LP-FT killed in its second fine-tuning epoch (after the probe stage), and the L-BFGS head
    killed in its second epoch (one full-batch step an epoch), end as an uninterrupted run does."""
    run = [
        f"+recipe={recipe}",
        *TINY,
        *QUICK,
        "trainer.max_epochs=3",
        "data.batch_size=8",
        "data=folder",
        f"data.root={image_folder}",
        "+trainer.limit_train_batches=4",
        "head.fit.folds=2",
        "callbacks.checkpoint.min_write_interval_s=0",
        f"data.cache.dir={tmp_path / 'cache'}",
    ]
    first = cli(*run, "hydra.run.dir=a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert ("LP-FT: probe head fitted" if recipe == "lp_ft" else "full-batch L-BFGS") in first.stdout
    killed = cli(*run, "hydra.run.dir=b", cwd=tmp_path, kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = cli(*run, "hydra.run.dir=b", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "LP-FT" not in resumed.stdout  # the probe is in the checkpoint: not fitted again
    a, b = weights(tmp_path / "a" / "checkpoints" / LAST), weights(tmp_path / "b" / "checkpoints" / LAST)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    history = [json.loads((tmp_path / d / "summary.json").read_text())["history"] for d in ("a", "b")]
    assert history[0] == history[1] and len(history[0]) == 3
