"""Use a trained model: ``model = finetune.load(PATH)``, then ``model.predict(images_or_paths)``.

The checkpoint carries the resolved config and the class list, so the exact network (backbone,
head, frozen-BatchNorm structure) and the exact evaluation preprocessing are rebuilt from it: no
download, and the same loader and pipeline as validation during training.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.data.images import IMAGE_EXTENSIONS, as_rgb_array
from finetune.data.sources import load_data, relabel
from finetune.data.transforms import build_transforms, with_input_size
from finetune.errors import ConfigError, DataError, WeightsError
from finetune.model.build import CHECKPOINT_KEY, backbone_from_config, build_model
from finetune.model.weights import read_state_dict, read_torch_file
from finetune.use.confidence import UNKNOWN, DecisionRule, decision_rule
from finetune.use.notebook import Predictions, model_html
from finetune.use.tta import check_tta, tta_probabilities


@dataclass(frozen=True)
class LabelSet:
    """A multi-label prediction for one image: ``labels``, the (label, probability) pairs at or
    above their thresholds (most probable first; empty: no label applies), and ``probabilities``
    of every label."""

    source: str
    labels: list[tuple[str, float]]
    probabilities: dict[str, float]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.labels]


@dataclass(frozen=True)
class Prediction:
    """Top-k labels with (calibrated) probabilities for one image. ``label``: the top one, or
    ``"unknown"`` when its probability is below the abstain threshold (``unknown`` is then True);
    ``probability``: the top one's either way. ``prediction_set``: with ``coverage``, the
    conformal set of (label, probability), most probable first (see :mod:`finetune.use.confidence`)."""

    source: str
    top_k: list[tuple[str, float]]
    unknown: bool = False
    prediction_set: list[tuple[str, float]] | None = None

    @property
    def label(self) -> str:
        return UNKNOWN if self.unknown else self.top_k[0][0]

    @property
    def probability(self) -> float:
        return self.top_k[0][1]


class FinetunedModel:
    r"""A trained classifier with its classes and preprocessing.

    ``model`` is the ``nn.Module`` (eval mode, logits out); ``classes`` the names in label order;
    ``data_config`` input size, mean, std, interpolation and crop as used in training. Multi-label
    models (``task == "multilabel"``) have per-label ``thresholds`` (tuned on the validation split;
    0.5 for a checkpoint written before tuning) and :meth:`predict` returns :class:`LabelSet`\ s.
    Multi-class models have a ``temperature`` (fitted on the validation split after training; 1.0
    for a checkpoint written before calibration) that every probability is computed with, and
    ``trust``: what abstaining and prediction sets are chosen from (:meth:`decision_rule`).
    """

    def __init__(
        self,
        model: nn.Module,
        classes: list[str],
        data_config: dict,
        config: dict,
        thresholds: dict[str, float] | None = None,
        min_labels: int = 0,
        max_labels: int | None = None,
        trust: dict | None = None,
    ):
        self.model = model.eval()
        self.classes = list(classes)
        self.data_config = dict(data_config)
        self.config = config
        self.task = config.get("task", "multiclass")
        self.thresholds = (
            [float((thresholds or {}).get(c, 0.5)) for c in self.classes] if self.task == "multilabel" else None
        )
        # multi-label: the fewest and most labels an answer has (see finetune.use.multilabel.decisions)
        self.min_labels, self.max_labels = int(min_labels), max_labels
        self.trust = dict(trust or {})
        self.temperature = float(self.trust.get("temperature", 1.0))
        _, self.transform = build_transforms(self.data_config, {"random_resized_crop": False})

    def run_config(self, overrides: Sequence[str] = ()) -> DictConfig:
        """The config a command's data come from: `overrides` composed afresh when given, else
        the training config stored in the checkpoint, completed with today's defaults for keys
        it predates."""
        from finetune.config import compose_config

        if overrides:
            return compose_config(list(overrides))
        defaults = OmegaConf.to_container(compose_config([]), resolve=False)
        return OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.create(self.config))

    def evaluation_samples(self, overrides: Sequence[str] = ()) -> tuple[list, list]:
        """(samples labelled with this model's classes, matched by name; files skipped): the test
        split, else the validation split, of the data `overrides` describe, or of the training
        data when there are none."""
        cfg = self.run_config(overrides)
        splits = load_data(cfg.data, cfg.seed, self.task)
        if self.task == "multilabel":
            return relabel_sets(splits.test or splits.val, splits.classes, self.classes), list(splits.skipped)
        chosen = relabel(splits.test or splits.val, splits.classes, self.classes, "The data", "the model")
        return chosen, list(splits.skipped)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FinetunedModel:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"ckpt={str(path)!r} does not exist.")
        checkpoint = read_torch_file(path)  # says what a wrong file is (empty, JSON, ONNX, ...)
        meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if not meta:
            raise WeightsError(
                f"{path} is not a finetune checkpoint (no {CHECKPOINT_KEY!r} entry with classes and config)."
            )
        cfg = OmegaConf.create(meta["config"])
        backbone = backbone_from_config(cfg, weights="random")  # the checkpoint holds every weight
        model = build_model(backbone, len(meta["classes"]), cfg.head, cfg.freeze)
        state = {k.removeprefix("model."): v for k, v in read_state_dict(path).items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        data_config = with_input_size(backbone.data_config, cfg.data.get("image_size"))
        return cls(
            model,
            meta["classes"],
            data_config,
            meta["config"],
            meta.get("thresholds"),
            meta.get("min_labels", 0),
            meta.get("max_labels"),
            meta.get("trust"),
        )

    def preprocess(self, images: Iterable) -> torch.Tensor:
        """The exact input batch (N, 3, H, W) for paths, PIL images or arrays, each converted by
        :func:`finetune.data.images.as_rgb_array` (the training loader: a PIL image gives the
        tensor of its file; float arrays in [0, 1] and uint16 are scaled; ambiguous arrays are a
        ValueError)."""
        return torch.stack([self.transform(image=as_rgb_array(image))["image"] for image in images])

    @torch.no_grad()
    def logits(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        device = next(self.model.parameters()).device
        chunks = [
            self.model(self.preprocess(images[i : i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.classes))

    def probabilities(self, images: Sequence, batch_size: int = 32, tta: str = "none") -> torch.Tensor:
        """(N, C) class probabilities in input order (multi-label: each label's sigmoid). ``tta``
        (see :mod:`finetune.use.tta`): ``none`` is the softmax of :meth:`logits` / ``temperature``; ``flip``,
        ``crops``, ``crops_flip`` average the probabilities of 2, 5 or 10 views per image (as many
        forward passes); `batch_size` caps the views per forward pass."""
        check_tta(tta)
        if not len(images):
            return torch.empty(0, len(self.classes))
        return tta_probabilities(
            self.model,
            images,
            self.data_config,
            tta,
            batch_size,
            multilabel=self.task == "multilabel",
            temperature=self.temperature,
        )

    def decision_rule(
        self,
        min_confidence: float | None = None,
        target_precision: float | None = None,
        coverage: float | None = None,
        score: str | None = None,
    ) -> DecisionRule:
        """The rule :meth:`predict` applies: :func:`finetune.use.confidence.decision_rule` over
        what this model's checkpoint stored from its validation and calibration splits."""
        return decision_rule(self.trust, self.task, min_confidence, target_precision, coverage, score)

    def predict(
        self,
        images: Sequence,
        top_k: int = 1,
        batch_size: int = 32,
        names: Sequence[str] | None = None,
        *,
        tta: str = "none",
        min_confidence: float | None = None,
        target_precision: float | None = None,
        coverage: float | None = None,
        rule: DecisionRule | None = None,
    ) -> list[Prediction] | list[LabelSet]:
        """Top-k (label, probability) per image, in input order; multi-label models: the label set
        at the thresholds (`top_k` unused). `names` label the results (default: the paths, or the
        type of in-memory images); `tta` as :meth:`probabilities`. Multi-class only:
        ``min_confidence`` (or ``target_precision``, which picks it on the validation split) makes
        the answer ``"unknown"`` below it; ``coverage`` adds the conformal prediction set; `rule`
        (from :meth:`decision_rule`) instead of those three."""
        check_tta(tta)  # before any image is decoded
        rule = rule or self.decision_rule(min_confidence, target_precision, coverage)
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):  # one path, array or PIL image
            images = [images]
        images = list(images)
        names = list(names) if names is not None else [_describe(image) for image in images]
        found = self.predictions(self.probabilities(images, batch_size, tta), names, top_k, rule)
        found.inputs = images  # a notebook shows each image beside its answer
        return found

    def predictions(
        self, probabilities: torch.Tensor, names: Sequence[str], top_k: int = 1, rule: DecisionRule | None = None
    ) -> list[Prediction] | list[LabelSet]:
        """:meth:`predict`'s answers for (N, C) `probabilities` already computed (calibrated, in
        class order; a server computes them in batches of its own), one per name."""
        rule = rule or DecisionRule()
        if self.task == "multilabel":
            return Predictions(self._label_set(name, row.tolist()) for name, row in zip(names, probabilities))
        k = min(top_k, len(self.classes))
        values, indices = probabilities.topk(k, dim=1)
        answers, sets = rule.answers(probabilities.numpy()), rule.sets(probabilities.numpy())
        predictions = []
        for i, name in enumerate(names):
            top = [(self.classes[c], float(p)) for p, c in zip(values[i].tolist(), indices[i].tolist())]
            chosen = None if sets is None else self._ranked(probabilities[i].tolist(), sets[i])
            predictions.append(Prediction(name, top, bool(answers[i] < 0), chosen))
        return Predictions(predictions)

    def _ranked(self, row: list[float], chosen) -> list[tuple[str, float]]:
        """The (class, probability) pairs `chosen` (one bool per class) picks, most probable first."""
        return sorted(((c, float(p)) for c, p, yes in zip(self.classes, row, chosen) if yes), key=lambda cp: -cp[1])

    def _label_set(self, name: str, row: list[float]) -> LabelSet:
        from finetune.use.multilabel import decisions

        chosen = decisions(np.array([row]), self.thresholds, self.min_labels, self.max_labels)[0]
        return LabelSet(name, self._ranked(row, chosen), dict(zip(self.classes, row)))

    def _repr_html_(self) -> str:
        return model_html(self)

    def __repr__(self) -> str:
        task = ", multilabel" if self.task == "multilabel" else ""
        return f"FinetunedModel({self.config['backbone']['name']}{task}, classes={self.classes})"


def relabel_sets(samples: list, found: list[str], classes: list[str]) -> list:
    """Multi-label samples labelled by position in `found` -> by the model's `classes`, by name.
    A label the model lacks is a DataError."""
    unknown = sorted({found[i] for _, labels in samples for i in labels} - set(classes))
    if unknown:
        raise DataError(f"The data have labels the model lacks: {unknown}. Model labels: {classes}.")
    index = {c: i for i, c in enumerate(classes)}
    return [(item, tuple(sorted(index[found[i]] for i in labels))) for item, labels in samples]


def load(path: str | Path) -> FinetunedModel:
    """Load a checkpoint written by :func:`finetune.fit` or the CLI."""
    return FinetunedModel.from_checkpoint(path)


def expand_inputs(spec: str) -> list[str]:
    """A file, a folder (its images, recursively, sorted) or a glob pattern -> image paths."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ConfigError(f"input={spec!r} matches no image files.")
    return [str(p) for p in files]


def _describe(image) -> str:
    return str(image) if isinstance(image, (str, Path)) else type(image).__name__


__all__ = ["FinetunedModel", "LabelSet", "Prediction", "expand_inputs", "load", "relabel_sets"]
