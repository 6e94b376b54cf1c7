"""finetune: turn a pretrained ImageNet backbone into a classifier for your own images."""

import os

# albumentations asks a server for its latest version at import; never from a training run.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from finetune.api import fit  # noqa: E402
from finetune.inference import FinetunedModel, load  # noqa: E402
from finetune.train import FitResult  # noqa: E402

__all__ = ["FinetunedModel", "FitResult", "fit", "load"]
__version__ = "0.1.0"
