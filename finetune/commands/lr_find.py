"""``finetune lr-find``: the learning-rate range test of a run, before training it."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

from finetune.commands.args import output_dir, parse
from finetune.errors import ConfigError

OPTIONS = {"steps": "100", "min_lr": "1e-6", "max_lr": "1.0", "out": None}


def lr_find_command(args: Sequence[str]) -> int:
    """``finetune lr-find [+recipe=NAME] [OVERRIDES] [steps=100] [min_lr=1e-6] [max_lr=1.0] [out=DIR]``:
    set the run up as training would (data, model, freezing, layer groups, feature cache), raise
    the lr exponentially from min_lr to max_lr over `steps` optimizer steps, and print the
    suggested optimizer.lr (a tenth of the lr of the lowest training loss); the curve goes to
    DIR/lr_find.png and the numbers to DIR/lr_find.json. Layer groups keep their lr ratios and
    frozen layers stay frozen. optimizer.lr=auto in a training run does the same first."""
    import lightning as L

    from finetune.config import check_types, compose_config
    from finetune.console import run_log
    from finetune.train.lr_find import find_lr
    from finetune.train.run import prepare

    opts, overrides = parse(args, OPTIONS, "lr-find", "all")
    try:
        steps, min_lr, max_lr = int(opts["steps"]), float(opts["min_lr"]), float(opts["max_lr"])
    except ValueError:
        raise ConfigError(
            f"finetune lr-find: steps={opts['steps']}, min_lr={opts['min_lr']}, max_lr={opts['max_lr']}: "
            "steps is a whole number, min_lr and max_lr are numbers."
        ) from None
    if steps < 5:
        raise ConfigError(f"finetune lr-find: steps={steps}; the curve needs at least 5 steps (100 is usual).")
    cfg = compose_config(list(overrides))
    check_types(cfg)
    out = output_dir(opts["out"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with run_log(out):
        prepared = prepare(cfg, out, find_lr=False)  # optimizer.lr=auto: the finder sets the lrs
        finding = find_lr(prepared.module, prepared.data, prepared.trainer_kwargs, out, steps, min_lr, max_lr)
    (out / "lr_find.json").write_text(
        json.dumps(
            {
                "suggestion": finding.suggestion,
                "steps": len(finding.lrs),
                "min_lr": min_lr,
                "max_lr": max_lr,
                "lr": finding.lrs,
                "loss": finding.losses,
            },
            indent=2,
        )
    )
    if finding.suggestion is None:
        print(f"lr finder: no suggestion, the loss never fell over {len(finding.lrs)} steps; look at the curve")
    else:
        shown = [a for a in overrides if not a.startswith("optimizer.lr=")]
        print(
            f"lr finder: suggested optimizer.lr={finding.suggestion:.3g} (a tenth of the lr of the lowest training "
            f"loss, {len(finding.lrs)} steps from {min_lr:g} to {max_lr:g})"
        )
        print(f"  train with: finetune {shlex.join([*shown, f'optimizer.lr={finding.suggestion:.3g}'])}")
    print(f"  curve: {finding.picture}\n  numbers: {out / 'lr_find.json'}")
    return 0
