"""One training run: ``run(cfg)`` and what it assembles (the Lightning module, optimizer groups,
gradual unfreezing, checkpoints and resume, loggers, DDP, sweeps, faults, the run's report).
"""
