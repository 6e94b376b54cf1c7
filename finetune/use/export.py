"""Export a trained model for serving: ONNX (dynamic batch), TorchScript, safetensors with a
timm-compatible config, or ``hub``: a timm model folder in the Hugging Face Hub's layout
(``model.safetensors`` and ``config.json`` written by timm's own ``save_for_hf``) that
``timm.create_model("local-dir:DIR", pretrained=True)`` loads, and ``hf-hub:ORG/NAME`` once
uploaded; its parity is checked through exactly that load. Only a timm classifier fits that
layout (a timm backbone, its classifier a single Linear on average-pooled features): ``hub``
refuses any other model with a :class:`ConfigError` before writing anything.

Every export writes ``preprocessing.json`` (input size, mean, std, interpolation, crop, class
names, the temperature and the decision rule) beside the model and is checked for parity: the
exported model's logits must match PyTorch's within ``tolerance`` (max abs) on a real batch, and
its decisions PyTorch's on every image of it: the same class (or ``unknown``) and the same
prediction set under the rule, or for a multi-label model the same label set at the thresholds
``preprocessing.json`` carries.

ONNX and TorchScript models have two outputs: ``logits`` and ``probabilities``, the calibrated
softmax (``softmax(logits / temperature)``; multi-label: each label's sigmoid), so a runtime gets
calibrated probabilities without knowing about temperatures.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import ConfigError, FinetuneError
from finetune.files import follow_umask
from finetune.model.backbone import fixed_size_kwargs
from finetune.use.confidence import DecisionRule
from finetune.use.load import FinetunedModel

FORMATS = ("onnx", "torchscript", "safetensors", "hub")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    preprocessing: Path
    max_abs_diff: float
    same_decisions: int = 0  # images whose class or unknown and set (multi-label: label set) match PyTorch's


class ParityError(FinetuneError):
    """The exported model does not reproduce PyTorch's logits."""


class WithProbabilities(torch.nn.Module):
    """`model` with a second output: calibrated probabilities (softmax of logits / temperature,
    or each label's sigmoid)."""

    def __init__(self, model: torch.nn.Module, temperature: float, multilabel: bool):
        super().__init__()
        self.model, self.temperature, self.multilabel = model, float(temperature), multilabel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, (logits.sigmoid() if self.multilabel else (logits / self.temperature).softmax(dim=1))


def export(
    model: FinetunedModel,
    fmt: str,
    out_dir: Path,
    sample: torch.Tensor,
    tolerance: float = 1e-4,
    rule: DecisionRule | None = None,
) -> ExportResult:
    """Write `model` in format `fmt` to `out_dir`; verify parity on `sample` (N, 3, H, W) under
    `rule` (abstain and prediction sets, multi-class; default: none), which ``preprocessing.json``
    carries."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}; choose one of {', '.join(FORMATS)}.")
    rule = rule or DecisionRule()
    if fmt == "hub":  # refused before anything is written
        timm_model, reason = timm_layout(model)
        if reason:
            raise ConfigError(
                f"format=hub needs a model that timm.create_model('local-dir:DIR') loads, and {reason}: "
                f"use format=safetensors (finetune's layout) or format=onnx."
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    net = model.model.eval()
    with torch.no_grad():
        reference = net(sample)
    if fmt == "hub":
        path, exported = _hub(model, timm_model, out_dir, sample)
    else:
        path, exported = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}[fmt](
            model, out_dir, sample
        )
    diff = float((exported - reference).abs().max())
    if diff > tolerance:
        raise ParityError(f"{path}: exported logits differ from PyTorch's by {diff:.2e} (> {tolerance:.0e}).")
    same = int((decisions(model, exported, rule) == decisions(model, reference, rule)).all(dim=1).sum())
    if same < len(sample):
        raise ParityError(
            f"{path}: {len(sample) - same} of {len(sample)} images get another "
            f"{'label set' if model.thresholds else 'answer'} from the exported model."
        )
    preprocessing = out_dir / "preprocessing.json"
    preprocessing.write_text(json.dumps(_preprocessing(model) | rule.describe(), indent=2))
    return ExportResult(path, preprocessing, diff, same)


def decisions(model: FinetunedModel, logits: torch.Tensor, rule: DecisionRule) -> torch.Tensor:
    """What an image's answer is, as a row per image: the class (-1: unknown) followed by the
    prediction set's membership when `rule` makes sets; multi-label: the label decisions at the
    model's thresholds."""
    logits = logits.float()
    if model.thresholds is not None:
        from finetune.use.multilabel import decisions as label_decisions

        return torch.from_numpy(
            label_decisions(torch.sigmoid(logits).numpy(), model.thresholds, model.min_labels, model.max_labels)
        )
    probabilities = (logits / model.temperature).softmax(dim=1).numpy()
    answers = torch.from_numpy(rule.answers(probabilities)).long()[:, None]
    sets = rule.sets(probabilities)
    return answers if sets is None else torch.cat([answers, torch.from_numpy(sets).long()], dim=1)


def _preprocessing(model: FinetunedModel) -> dict:
    dc = model.data_config
    return {
        "architecture": model.config["backbone"]["name"],
        "input_size": list(dc["input_size"]),
        "mean": list(dc["mean"]),
        "std": list(dc["std"]),
        "interpolation": dc["interpolation"],
        "crop_pct": dc["crop_pct"],
        "resize": "shorter side to floor(min(input_size) / crop_pct), then center crop",
        "pixel_range": "RGB uint8 / 255, then (x - mean) / std",
        "classes": model.classes,
        **(
            {
                "task": "multilabel",
                "output": "sigmoid(logits) per label; a label applies when its probability "
                ">= its threshold, but at least min_labels and at most max_labels (null: any) of the most probable",
                "min_labels": model.min_labels,
                "max_labels": model.max_labels,
                "thresholds": dict(zip(model.classes, model.thresholds)),
            }
            if model.thresholds is not None
            else {
                "task": "multiclass",
                "output": "softmax(logits / temperature): calibrated probabilities",
                "temperature": model.temperature,
                "temperature_split": model.trust.get("temperature_split"),
            }
        ),
    }


def _onnx(model: FinetunedModel, out_dir: Path, sample: torch.Tensor):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "ONNX export needs: pip install 'finetune[export]' (onnx, onnxscript, onnxruntime)."
        ) from None
    path = out_dir / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _with_probabilities(model),
            (sample,),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["images"],
            output_names=["logits", "probabilities"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A batch size other than the traced one proves the dynamic batch axis.
    doubled = torch.cat([sample, sample])
    out = torch.from_numpy(session.run(None, {"images": doubled.numpy()})[0])
    return path, out[: len(sample)]


def _torchscript(model: FinetunedModel, out_dir: Path, sample: torch.Tensor):
    path = out_dir / "model.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, still what servers load
        traced = torch.jit.trace(_with_probabilities(model), sample)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return path, loaded(sample)[0]


def _with_probabilities(model: FinetunedModel) -> WithProbabilities:
    return WithProbabilities(model.model, model.temperature, model.task == "multilabel").eval()


def timm_layout(model: FinetunedModel) -> tuple[torch.nn.Module | None, str | None]:
    """(timm's own model for `model`, carrying its weights, None), or (None, why there is none):
    a timm backbone whose head is one Linear on average-pooled features maps onto timm's
    classifier; an MLP head, other pooling, or a torchvision:ARCH / lenet5 backbone does not."""
    import timm

    name = model.config["backbone"]["name"]
    if not timm.is_model(name):
        return None, f"{name} is not a timm model"
    if model.config["head"].get("hidden"):
        return None, f"its head is an MLP (head.hidden={model.config['head']['hidden']}), not timm's linear classifier"
    pool = model.config["head"].get("pool")
    if pool not in (None, "avg"):
        return None, f"its features are pooled with head.pool={pool}, which timm's classifier does not do"
    linear = [m for m in model.model.head if isinstance(m, torch.nn.Linear)]
    # A fixed-size model (ViT, ...) trained at another size is created at that size again.
    size = fixed_size_kwargs(name, model.config["data"].get("image_size"))
    timm_model = timm.create_model(name, pretrained=False, num_classes=len(model.classes), **size)
    classifier = timm_model.pretrained_cfg.get("classifier")
    if len(linear) != 1 or not isinstance(classifier, str):
        return None, f"timm's {name} has no single linear classifier to hold the head"
    state = {k.removeprefix("backbone."): v for k, v in model.model.state_dict().items() if k.startswith("backbone.")}
    state[f"{classifier}.weight"] = linear[0].weight
    state[f"{classifier}.bias"] = linear[0].bias
    missing, unexpected = timm_model.load_state_dict(state, strict=False)
    # Only bookkeeping may be absent (FrozenBatchNorm2d keeps no num_batches_tracked).
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise FinetuneError(f"Cannot map onto timm's {name}: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return timm_model.eval(), None


def _hub(model: FinetunedModel, timm_model: torch.nn.Module, out_dir: Path, sample: torch.Tensor):
    """timm's Hub layout, written by timm's ``save_for_hf`` (weights as safetensors; ``config.json``
    with the architecture, its arguments, the label names and the preprocessing finetune used),
    read back the way a user will: ``timm.create_model("local-dir:DIR", pretrained=True)``."""
    import timm
    from timm.models import save_for_hf

    dc = model.data_config
    save_for_hf(
        timm_model,
        str(out_dir),
        model_config={"label_names": model.classes},
        safe_serialization=True,
        data_config={
            k: dc[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in dc
        },
    )
    path = out_dir / "model.safetensors"
    follow_umask(path)  # safetensors writes 0600
    check = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    with torch.no_grad():
        return path, check(sample)


def _safetensors(model: FinetunedModel, out_dir: Path, sample: torch.Tensor):
    """A timm model file when :func:`timm_layout` maps the model onto timm (loads with
    ``timm.create_model``), else the Classifier's own state dict."""
    import timm
    from safetensors.torch import save_file

    name = model.config["backbone"]["name"]
    n = len(model.classes)
    path = out_dir / "model.safetensors"
    timm_model, _ = timm_layout(model)
    if timm_model is not None:
        size = fixed_size_kwargs(name, model.config["data"].get("image_size"))
        save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
        follow_umask(path)  # safetensors writes 0600
        config = {
            "architecture": name,
            "num_classes": len(model.classes),
            "label_names": model.classes,
            "pretrained_cfg": {
                k: model.data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
            },
            "load": f"timm.create_model({name!r}, pretrained=True, num_classes={n}, "
            + "".join(f"{k}={v!r}, " for k, v in size.items())
            + f"pretrained_cfg_overlay=dict(file='model.safetensors', num_classes={n}))",
        }
        # The overlay's num_classes must match: otherwise timm drops the classifier as a mismatch.
        check = timm.create_model(
            name, pretrained=True, num_classes=n, **size, pretrained_cfg_overlay=dict(file=str(path), num_classes=n)
        ).eval()
    else:  # an MLP head or special pooling is not a timm classifier: keep finetune's layout
        save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
        follow_umask(path)  # safetensors writes 0600
        config = {
            "architecture": name,
            "format": "finetune Classifier state dict (backbone.*, head.*)",
            "num_classes": len(model.classes),
            "label_names": model.classes,
            "config": model.config,
        }
        check = model.model
        from safetensors.torch import load_file

        check.load_state_dict(load_file(str(path)))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    with torch.no_grad():
        return path, check.eval()(sample)
