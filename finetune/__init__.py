"""finetune: turn a pretrained ImageNet backbone into a classifier for your own images.

``fit``, ``check_data``, ``audit``, ``load``, ``FitResult`` and ``FinetunedModel`` are imported on first use, so that
``import finetune`` (and ``finetune --help``) does not pay for Lightning, timm and torch upfront.
"""

import os

# albumentations asks a server for its latest version at import; never from a training run.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__all__ = ["FinetunedModel", "FitResult", "audit", "check_data", "fit", "load"]
__version__ = "0.1.0"

_LAZY = {
    "fit": "finetune.api",
    "check_data": "finetune.api",
    "audit": "finetune.api",
    "load": "finetune.use.load",
    "FinetunedModel": "finetune.use.load",
    "FitResult": "finetune.train.result",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        import warnings

        with warnings.catch_warnings():  # tqdm.auto in a notebook without ipywidgets: nothing to act on
            warnings.filterwarnings("ignore", message="IProgress not found")
            value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
