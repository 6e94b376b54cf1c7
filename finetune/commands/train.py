"""Training from the command line, ``finetune [OVERRIDES]`` (``-m`` for a sweep): the command line
checked before Hydra runs it, the job Hydra runs (one run, or one sweep trial whose failure the sweep
survives), and a stop by signal turned into one line and its exit code. :mod:`finetune.cli` only
dispatches to here or to the other commands.
"""

from __future__ import annotations

import os
import sys

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from finetune.console import is_rank_zero
from finetune.errors import ConfigError, FinetuneError
from finetune.train.distributed import in_sweep_child, relaunchable_job


def fail(err: Exception) -> None:
    """One paragraph and exit code 2; HYDRA_FULL_ERROR=1 shows the whole traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def train_job(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from finetune.train.run_folder import RunStopped

    hydra_cfg = HydraConfig.get()
    sweep = _in_sweep()
    try:
        with relaunchable_job(hydra_cfg.overrides.task, hydra_cfg.runtime.output_dir, sweep):
            if sweep:
                return _sweep_trial(cfg)
            from finetune.train.run import run

            try:
                result = run(cfg)
            except FinetuneError as err:
                fail(err)
    except RunStopped as stop:
        _stopped(stop, hydra_cfg, sweep)
    except KeyboardInterrupt:  # Ctrl-C before the run took its folder
        _stopped(None, hydra_cfg, sweep)
    # Sweepers (Optuna) maximize what the task returns.
    return result.metrics.get(result.objective)


def _stopped(stop, hydra_cfg, sweep: bool) -> None:
    """A run stopped by SIGTERM (preemption: SLURM, ``scancel``, ``docker stop``, Kubernetes) or
    SIGINT (Ctrl-C): one line saying how to continue, then exit 128 + the signal's number (143,
    130), never 0, so that ``finetune ... && deploy`` stops there. The checkpoints are on disk by
    then (:mod:`finetune.train.run_folder`). Lightning's SLURM auto-requeue is left as it is: its
    SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` and requeues the job before SLURM's SIGTERM, the
    requeued job re-runs this command line unchanged, and the run folder lets it in."""
    import shlex

    from finetune.config import hydra_value

    if stop is None:
        print("\nstopped by SIGINT before training started", file=sys.stderr, flush=True)
        sys.exit(130)
    if is_rank_zero():
        if sweep:
            print(f"{stop} (sweep trial in {stop.output_dir})", file=sys.stderr, flush=True)
        else:
            dropped = ("resume", "overwrite") + (("ckpt_path",) if stop.last is not None else ())
            kept = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in dropped]
            again = ["finetune", *kept, f"hydra.run.dir={hydra_value(str(stop.output_dir))}"]
            hint = (
                f"continue with: {shlex.join([*again, 'resume=true'])}"
                if stop.last is not None
                else f"no checkpoint was written yet; start again with: {shlex.join(again)}"
            )
            print(f"{stop}; {hint}", file=sys.stderr, flush=True)
    sys.exit(stop.code)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN) or in_sweep_child()


def _sweep_trial(cfg: DictConfig) -> float:
    """One trial of a sweep; a failure is written to error.txt and the sweep goes on.

    Hydra's basic sweeper stops at the first exception, so it gets NaN for a failed trial; any
    other sweeper gets the exception, which is how the Optuna sweeper (finetune/search/optuna_sweeper.py)
    records a FAIL trial with its error.
    """
    import math
    import traceback
    from pathlib import Path

    from omegaconf import open_dict

    from finetune.search.sweep import ERROR_FILE, basic_sweeper
    from finetune.train.run import run

    if not cfg.viz.get("sweep_trials", False):  # the sweep draws its best trial's pictures at its end
        with open_dict(cfg):
            cfg.viz.enabled = False
    try:
        result = run(cfg)
        value = result.metrics.get(result.objective)
        if value is None or math.isnan(value):
            raise FinetuneError(
                f"The run recorded no usable {result.objective} ({value}); it is the sweep's objective."
            )
        return value
    except Exception as err:  # noqa: BLE001 - isolating any trial failure is the point
        if is_rank_zero():
            output_dir = Path(cfg.paths.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            print(f"error: trial failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if not is_rank_zero() or basic_sweeper():  # rank > 0: its rank zero records the failure
            return float("nan")
        raise


def check_command_line(args: list[str]) -> None:
    """Check the command line before Hydra runs it, so that an unknown key, a missing extra or a
    run folder that holds a finished run exits with code 2 and a sentence that names the fix
    (Hydra itself exits 1, and would already have rewritten that folder's ``.hydra/``), under -m too.

    This is finetune's one composition of the run's config; the run gets the one ``hydra.main``
    composes. They cannot be the same: ``hydra.main`` composes by itself (twice: ``get_mode``, then
    ``run``), and a composition error there is printed and exits 1 before any hook of ours runs."""
    if not args:
        return
    from finetune.commands.preflight import check_overrides

    try:
        cfg = check_overrides(args)
        run_dir = next((a.partition("=")[2] for a in args if a.startswith("hydra.run.dir=")), None)
        if cfg is not None and not {"-m", "--multirun"} & set(args):
            from pathlib import Path

            from finetune.train.run_folder import busy_refusal, leads_the_run, make_folder, reuse_refusal

            if not leads_the_run():  # DDP's extra processes re-run this command into rank zero's folder
                return

            # Hydra writes .hydra/ and its log into the run folder before the run starts: check it first.
            folder = Path(run_dir).resolve() if run_dir else None
            refusal = (busy_refusal(folder) or reuse_refusal(cfg, folder)) if folder else None
            if refusal:
                raise ConfigError(refusal)
            make_folder(Path(run_dir or "outputs").resolve())
    except (FinetuneError, HydraException, OmegaConfBaseException) as err:
        fail(err)
