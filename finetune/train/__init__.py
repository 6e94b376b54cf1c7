"""One training run: ``run(cfg)`` and what it assembles (the Lightning module, optimizer groups,
gradual unfreezing, checkpoints and resume, loggers, DDP, faults, the run's report). Many runs
(sweeps, auto) are :mod:`finetune.search`, a floor above.
"""
