"""``hydra/sweeper=optuna``: a Hydra sweeper that drives an Optuna study through ask and tell.

``finetune -m +hparams_search=optuna ...`` selects it (conf/hydra/sweeper/optuna.yaml; the keys
are those of hydra-optuna-sweeper 1.3, which it replaces). The contract:

- The space is ``hydra.sweeper.params`` followed by the command line's task overrides, parsed by
  Hydra's own override parser; a later override of a key replaces an earlier one.
  ``interval(a, b)`` is a FloatDistribution, ``tag(log, interval(a, b))`` its log form,
  ``int(interval(a, b))`` an IntDistribution; ``range(a, b, step)`` spans the values Hydra's grid
  would take (``b`` excluded) with that step; ``choice(a, b)``, ``a,b`` and ``shuffle(...)`` are
  categorical. A plain ``key=value`` goes to every trial as typed.
- Each round asks ``n_jobs`` trials, launches them as one batch of Hydra's launcher and tells each
  its result. Job N (folder N) is trial N of the study, also when a stored study goes on or other
  processes share it; each trial keeps its folder as user attr ``output_dir``.
- A job that raises, returns NaN or returns no number is told FAIL; one that raises
  ``optuna.TrialPruned`` is PRUNED and no failure. When the failed share of a round exceeds
  ``max_failure_rate`` the sweep stops with an error (Hydra exits 1), as the plugin did.
- ``storage`` + ``study_name`` load the study if it exists, so a sweep continues it; with
  ``shared=true`` several workers share it (:mod:`finetune.search.storage`: heartbeats, killed
  workers' trials retried, ``n_trials`` counts the study's COMPLETE/PRUNED trials). At the end
  ``<sweep dir>/optimization_results.yaml`` holds the study's best trial (name, best_params,
  best_value, as the plugin wrote it).
- One objective: ``direction`` is ``maximize`` or ``minimize`` (or a list of one). Samplers come
  from ``optuna.samplers`` only: a ``_target_`` runs code. Left out from the plugin: several
  objectives, GridSampler (Hydra's own sweeper does grids: ``a=1,2,3`` without ``+hparams_search``),
  ``custom_search_space`` and the deprecated ``search_space``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from finetune.console import setup
from finetune.errors import ConfigError
from finetune.search.storage import Heartbeats, hide_password, open_storage, shared_trials

SAMPLERS = "optuna.samplers."
RESULTS_FILE = "optimization_results.yaml"


class SweepFailed(RuntimeError):
    """More trials of a round failed than ``max_failure_rate`` allows, or none ever completed."""


def search_space(arguments: Sequence[str], config_loader: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(distributions, fixed)`` for ``key=value`` override strings: Optuna distributions by key
    for the sweeps, the override as typed by key for the rest. A later override of a key wins."""
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(list(arguments)):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = distribution(override)
        else:
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    return distributions, fixed


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, key = override.value(), override.get_key_element()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    shuffled = isinstance(value, (ChoiceSweep, RangeSweep)) and value.shuffle
    if isinstance(value, RangeSweep) and not shuffled:
        values = list(value.range())
        if not values:
            raise ConfigError(f"{override.input_line}: the range holds no value.")
        low, high, step = min(values), max(values), abs(value.step)
        if all(isinstance(v, int) for v in (*values, value.step)):
            return IntDistribution(low, high, step=step)
        return FloatDistribution(float(low), round(float(high), 12), step=float(step))
    if override.is_discrete_sweep():
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        wrong = [c for c in choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if wrong:
            raise ConfigError(
                f"{override.input_line}: a choice for Optuna is a number, a string, a boolean or "
                f"null, not {wrong[0]!r}; list such values under {key} instead."
            )
        return CategoricalDistribution(choices)
    raise ConfigError(f"{override.input_line}: Optuna takes interval(...), range(...) or choice(...) sweeps.")


def trial_overrides(params: dict[str, Any], fixed: dict[str, str]) -> list[str]:
    """The overrides of one trial: its sampled values (strings escaped as Hydra's grid does them:
    ``a\\,b`` stays one value), then the fixed overrides as typed."""
    return [f"{key}={Transformer.str(value)}" for key, value in params.items()] + list(fixed.values())


class OptunaSweeper(Sweeper):
    """Hydra sweeper over an Optuna study (the module docstring has the contract)."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: Any = "minimize",
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 2,
        max_failure_rate: float = 0.0,
        params: DictConfig | None = None,
        *,
        shared: bool = False,
        heartbeat_interval: int = 10,
        grace_period: int | None = None,
        max_retry: int = 3,
    ) -> None:
        directions = (
            list(direction) if OmegaConf.is_list(direction) or isinstance(direction, (list, tuple)) else [direction]
        )
        if len(directions) != 1 or str(directions[0]) not in ("maximize", "minimize"):
            raise ConfigError(
                f"hydra.sweeper.direction={direction}: set maximize or minimize. The sweeper "
                "optimizes one objective, the number each run returns."
            )
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: a share between 0.0 and 1.0.")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be at least 1.")
        self.sampler_config = sampler
        self.direction = str(directions[0])
        self.storage = storage
        self.study_name = study_name
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.params = params
        self.shared = bool(shared)
        self.heartbeat = (int(heartbeat_interval), grace_period, int(max_retry))
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        assert self.config is not None and self.launcher is not None
        sampler = self._sampler()
        space = [f"{key}={value}" for key, value in _flat(self.params).items()]
        loader = self.hydra_context.config_loader if self.hydra_context is not None else None
        distributions, fixed = search_space(space + list(arguments), loader)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage, self.shared, *self.heartbeat),
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        _check_continues(study, distributions)
        setup().info(
            "Optuna study %s (%s, %s, %d trials before this sweep): %d trials%s, %d at a time, %s",
            study.study_name,
            hide_password(self.storage) if self.storage else "in memory",
            type(study.sampler).__name__,
            len(study.trials),
            self.n_trials,
            " in the study, shared by its workers" if self.shared else "",
            self.n_jobs,
            self.direction,
        )
        self.to_go = self.n_trials
        while trials := self._ask(study, distributions):
            numbers = [t.number for t in trials]
            # Job N is trial N: a launch numbers its jobs from its first, so trials that another
            # process's trials interleave go one launch each.
            contiguous = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            batches = [trials] if contiguous else [[t] for t in trials]
            with Heartbeats(study, trials):
                returns = [
                    ret
                    for batch in batches
                    for ret in self.launcher.launch(
                        [trial_overrides(t.params, fixed) for t in batch], initial_job_idx=batch[0].number
                    )
                ]
            failures = [error for trial, ret in zip(trials, returns) if (error := self._told(study, trial, ret))]
            if len(failures) / len(returns) > self.max_failure_rate:
                first = failures[0]
                first_text = f"{type(first).__name__}: {first}" if isinstance(first, BaseException) else first
                raise SweepFailed(
                    f"{len(failures)} of {len(returns)} trials failed, more than hydra.sweeper.max_failure_rate="
                    f"{self.max_failure_rate} allows; the sweep stops (study {study.study_name}). The first: "
                    f"{first_text}. hydra.sweeper.max_failure_rate=1.0 lets a study go on past failed trials."
                ) from (first if isinstance(first, BaseException) else None)
        self._write_results(study, sweep_dir)

    def _ask(self, study: Any, distributions: dict[str, Any]) -> list[Any]:
        """The next round's trials; none when the sweep (or, shared, the study) has its n_trials."""
        if not self.shared:
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, self.to_go))]
            self.to_go -= len(trials)
            return trials
        return shared_trials(study, distributions, self.n_trials, self.n_jobs, self.heartbeat[0])

    def _sampler(self) -> Any:
        """The sampler from its config, built here so that only Optuna's samplers can be named."""
        from hydra.utils import instantiate

        target = str(OmegaConf.select(self.sampler_config, "_target_", default=""))
        if not target.startswith(SAMPLERS):
            raise ConfigError(
                f"hydra.sweeper.sampler._target_={target or '(none)'}: name one of Optuna's samplers "
                f"({SAMPLERS}TPESampler, RandomSampler, CmaEsSampler, ...)."
            )
        if target == SAMPLERS + "GridSampler":
            raise ConfigError(
                "GridSampler: for a grid use Hydra's own sweeper, without +hparams_search: "
                "finetune -m optimizer.lr=0.001,0.01 head.dropout=0,0.2"
            )
        return instantiate(self.sampler_config)

    def _told(self, study: Any, trial: Any, ret: JobReturn) -> Any:
        """:meth:`_tell`; a trial that another worker of a shared study failed meanwhile (its
        heartbeats stopped for ``grace_period``) keeps FAIL, its copy queued again."""
        import optuna

        try:
            return self._tell(study, trial, ret)
        except optuna.exceptions.UpdateFinishedTrialError:
            setup().info("trial %d: failed by another worker (no heartbeat): its result is dropped", trial.number)
            return None

    def _tell(self, study: Any, trial: Any, ret: JobReturn) -> Any:
        """Tell `trial` its job's result; returns the failure (an exception or a message) or None."""
        import optuna

        output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        if output_dir:
            trial.set_user_attr("output_dir", str(output_dir))
        log = setup()
        if ret.status == JobStatus.FAILED:
            error = ret._return_value  # the job's exception (.return_value re-raises it and prints to stderr)
            pruned = isinstance(error, optuna.TrialPruned)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL)
            log.info("trial %d: %s", trial.number, "pruned" if pruned else f"failed ({type(error).__name__})")
            return None if pruned else error
        value = ret.return_value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number):
            # Telling NaN would make Optuna record FAIL with a warning of its own; say why here.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            message = f"trial {trial.number} returned {value!r}, not a number to {self.direction}"
            log.info("trial %d: failed (returned %r)", trial.number, value)
            return message
        study.tell(trial, number)
        best = study.best_trial
        log.info("trial %d: %s (best: %s, trial %d)", trial.number, number, best.value, best.number)
        return None

    def _write_results(self, study: Any, sweep_dir: Path) -> None:
        import optuna

        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            raise SweepFailed(
                f"No trial of study {study.study_name} completed: {sweep_dir / 'summary.csv'} lists each trial's error."
            )
        best = study.best_trial
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "best_trial": best.number,
            "best_params": best.params,
            "best_value": best.value,
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        setup().info(
            "best trial of study %s: %d, value %s, %s",
            study.study_name,
            best.number,
            best.value,
            " ".join(trial_overrides(best.params, {})),
        )


def _check_continues(study: Any, distributions: dict[str, Any]) -> None:
    """Refuse, before any trial is asked, a space whose kind of a key differs from the stored
    study's (Optuna would refuse it in the middle of ``ask`` and leave that trial RUNNING)."""
    from optuna.distributions import check_distribution_compatibility

    known = {key: d for trial in study.get_trials(deepcopy=False) for key, d in trial.distributions.items()}
    for key, new in distributions.items():
        try:
            check_distribution_compatibility(known.get(key, new), new)
        except ValueError as err:
            raise ConfigError(
                f"{key}: study {study.study_name} searched it as {known[key]}, this sweep as {new} "
                f"({err}). Search it as before, or start a study of its own: "
                "hydra.sweeper.study_name=NEW_NAME."
            ) from None


def _flat(params: Any, prefix: str = "") -> dict[str, Any]:
    """``params`` with nested keys dotted: ``+hydra.sweeper.params.optimizer.lr=...`` (Hydra's advice
    for a key the file lacks) nests ``lr`` under ``optimizer``, beside the file's ``optimizer.lr``."""
    flat: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if OmegaConf.is_dict(value) or isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
