"""A trained model on the Hugging Face Hub: the folder (:func:`hub_folder`) and its upload
(:func:`upload`).

The folder is timm's own layout (:func:`finetune.use.export.export` with ``format="hub"``:
``model.safetensors``, ``config.json``, ``preprocessing.json``, parity checked through
``timm.create_model("local-dir:DIR", pretrained=True)``), the model card ``README.md`` and the
pictures it shows (:mod:`finetune.use.model_card`).

The upload is one ``upload_folder`` call, which is one commit: the Hub shows all of the folder's
files or none of them, so a failure never leaves a half-pushed model that reads as a success.
Every failure a user can fix (no token, a refused token, no network, offline mode, a malformed
repo id) is a :class:`~finetune.errors.FinetuneError` with one line that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ConfigError, FinetuneError

if TYPE_CHECKING:  # torch and timm load when a folder is built: a missing token or network is told at once
    import torch

    from finetune.use.confidence import DecisionRule
    from finetune.use.export import ExportResult
    from finetune.use.load import FinetunedModel
    from finetune.use.model_card import ModelCard

# Exceptions of the HTTP clients huggingface_hub has used (requests, httpx, httpx2): the network failed.
_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpx2", "httpcore", "ssl", "socket")


class HubError(FinetuneError):
    """The Hub could not be reached, or refused the upload; nothing was committed."""


@dataclass(frozen=True)
class HubFolder:
    """A folder ready to upload: ``files``, the names written into ``path`` (nothing else there is
    uploaded), the export's parity, and the card."""

    path: Path
    export: ExportResult
    card: ModelCard

    @property
    def files(self) -> list[str]:
        written = [self.export.path, self.path / "config.json", self.export.preprocessing, self.card.readme]
        return [p.name for p in written + self.card.pictures]


def hub_folder(
    model: FinetunedModel,
    ckpt: str | Path,
    out_dir: Path,
    sample: torch.Tensor,
    tolerance: float = 1e-4,
    rule: DecisionRule | None = None,
    repo_id: str | None = None,
) -> HubFolder:
    """Write the Hub folder of `model` (read from checkpoint `ckpt`, whose run folder the card
    describes) into `out_dir`, parity checked on `sample` within `tolerance`; a model timm cannot
    load from a folder is refused (ConfigError) before anything is written."""
    from finetune.use.export import export
    from finetune.use.model_card import write_model_card

    result = export(model, "hub", out_dir, sample, tolerance, rule)
    return HubFolder(out_dir, result, write_model_card(model, ckpt, out_dir, repo_id))


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is ORG/NAME by the Hub's rules (huggingface_hub's ``validate_repo_id``,
    plus the owner, which a push needs), else a ConfigError; no network."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except ValueError:  # HFValidationError
        valid = False
    if not valid:
        raise ConfigError(
            f"repo_id={repo_id!r}: give ORG/NAME (a user or organization, a slash, the model's name; "
            f"letters, digits, '-', '_' and '.'), e.g. repo_id=alice/ants-vs-bees."
        )
    return repo_id


def hub_token() -> str:
    """The token huggingface_hub finds (``HF_TOKEN``, else the cached login), else a ConfigError."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as err:  # an OIDC exchange the environment asked for failed
        raise ConfigError(f"no Hugging Face token: {_one_line(err)}") from None
    if not token:
        raise ConfigError(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`; nothing was pushed."
        )
    return token


def hub_user(token: str) -> str:
    """The account `token` belongs to (one request): a missing network, offline mode or a refused
    token is a :class:`HubError` before any work is done."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="finetune")
    try:
        return str(api.whoami()["name"])
    except Exception as err:
        raise HubError(_failure(err, None, api.endpoint)) from None


def upload(
    folder: HubFolder,
    repo_id: str,
    token: str,
    private: bool = False,
    message: str = "Upload the model with finetune push",
) -> tuple[str, str]:
    """Create `repo_id` if needed (private when `private`; an existing public repository is
    refused then, rather than published to) and commit ``folder.files`` in one commit.
    Returns (the repository's URL, the commit's id)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="finetune")
    try:
        repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo.repo_id).private:
            raise HubError(
                f"{repo.repo_id} exists and is public: private=true cannot make it private; change its "
                f"visibility on the Hub or choose another repo_id; nothing was pushed."
            )
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(folder.path), allow_patterns=folder.files, commit_message=message
        )
    except HubError:
        raise
    except Exception as err:
        raise HubError(_failure(err, repo_id, api.endpoint)) from None
    return str(repo.url), commit.oid or ""


def _failure(err: Exception, repo_id: str | None, endpoint: str) -> str:
    """One line for a failed Hub call; anything that is neither the Hub's answer nor a network
    failure is a bug and goes up as it is."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push; nothing was pushed."
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        said = _one_line(getattr(err, "server_message", None) or err)
        if status == 401:
            return (
                f"the Hub refused the token (401: {said}): set HF_TOKEN to a valid token with write access "
                f"(https://huggingface.co/settings/tokens) or run `hf auth login`; nothing was pushed."
            )
        if status == 403 and repo_id:
            return (
                f"the token may not write to {repo_id} (403: {said}): use a token with write access to "
                f"{repo_id.split('/')[0]}; nothing was pushed."
            )
        return f"the Hub answered {status}{f' for {repo_id}' if repo_id else ''} ({said}); nothing was pushed."
    root = type(err).__module__.split(".")[0]
    if isinstance(err, OSError) or root in _NETWORK_MODULES:
        return (
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {_one_line(err)}): check "
            f"the network, or HF_ENDPOINT; nothing was pushed."
        )
    raise err


def _one_line(text) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 200 else line[:197] + "..."
