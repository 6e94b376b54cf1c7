"""What a server predicts with: ONNX Runtime (the default where it is installed) or PyTorch.

Both take the image exactly as :func:`finetune.load` does (the same decoder and the same
evaluation pipeline, :meth:`FinetunedModel.preprocess`) and give calibrated probabilities
(softmax of logits / temperature; multi-label: each label's sigmoid), so a served answer is
``finetune.load(ckpt).predict``'s answer. The ONNX model is exported from the checkpoint once,
checked for parity by :func:`finetune.use.export.export`, and kept in the cache folder keyed by
the checkpoint's content, so a restart reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.use.export import WithProbabilities, export
from finetune.use.load import FinetunedModel

RUNTIMES = ("auto", "onnx", "torch")


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of the checkpoint file: the served model's version."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Runtime:
    """`model`'s preprocessing and a batched forward pass giving calibrated probabilities."""

    name = "torch"

    def __init__(self, model: FinetunedModel):
        self.model = model
        # The module the ONNX model is exported from: logits and calibrated probabilities.
        self.net = WithProbabilities(model.model, model.temperature, model.task == "multilabel").eval()

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> the (3, H, W) float32 input :func:`finetune.load` would give."""
        return self.model.transform(image=rgb)["image"].numpy()

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(batch))[1].float().numpy()


class OnnxRuntime(Runtime):
    """The exported ONNX model's second output (calibrated probabilities) on ONNX Runtime's CPU provider."""

    name = "onnx"

    def __init__(self, model: FinetunedModel, onnx_path: Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # errors only: its graph-optimizer notes are not for the user
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"images": batch})[0]


def onnx_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


def make_runtime(model: FinetunedModel, choice: str, ckpt: Path, version: str, cache_dir: Path) -> Runtime:
    """The runtime `choice` names (``auto``: ONNX where installed, else PyTorch). The ONNX model
    lives in ``cache_dir/serve/VERSION[:16]/model.onnx``, exported on first use."""
    if choice not in RUNTIMES:
        raise ConfigError(f"runtime={choice!r}; choose one of {', '.join(RUNTIMES)}.")
    if choice == "torch" or (choice == "auto" and not onnx_installed()):
        return Runtime(model)
    if not onnx_installed():
        raise ConfigError(
            "runtime=onnx needs: pip install 'finetune[serve]' (onnxruntime, onnx, onnxscript); or runtime=torch."
        )
    folder = cache_dir.expanduser() / "serve" / version[:16]
    path = folder / "model.onnx"
    if not path.is_file():
        print(f"exporting {ckpt.name} to ONNX once (cached in {folder}) ...", flush=True)
        height, width = model.data_config["input_size"][1:]
        sample = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
        staging = folder.with_name(folder.name + f".part{os.getpid()}")  # two servers starting at once
        export(model, "onnx", staging, sample)
        if folder.exists():  # the other server finished first: its model is this one
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.replace(folder)
    return OnnxRuntime(model, path)
