"""Share a trained model: ``finetune push`` builds its Hub folder and uploads it in one commit
(:mod:`finetune.use.hub`)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from finetune.commands.args import REQUIRED, TRUST_OPTIONS, decision_rule_from, flag, output_dir, parse
from finetune.errors import ConfigError


def push_command(args: Sequence[str]) -> int:
    """``finetune push ckpt=PATH repo_id=ORG/NAME [private=true] [out=DIR] [input=IMAGES]
    [min_confidence=P | target_precision=P] [coverage=P [conformal=lac|aps]]``: builds the
    folder ``finetune export format=hub`` writes (timm weights and config, parity checked through
    ``timm.create_model("local-dir:DIR")``, preprocessing.json, the model card and the run's
    pictures; in a temporary folder unless out=DIR) and uploads it to the Hugging Face Hub as one
    commit. The token: HF_TOKEN, else the cached login (``hf auth login``). private=true: a new
    repository is private, and an existing public one is refused. Once pushed, the model loads
    with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``."""
    from finetune.use.hub import check_repo_id, hub_token, hub_user

    opts, _ = parse(
        args,
        {
            "ckpt": REQUIRED,
            "repo_id": REQUIRED,
            "private": "false",
            "out": None,
            "input": None,
            "tolerance": "1e-4",
            **TRUST_OPTIONS,
        },
        "push",
    )
    private = flag(opts, "private")
    repo_id = check_repo_id(opts["repo_id"])
    if not Path(opts["ckpt"]).is_file():
        raise ConfigError(f"ckpt={opts['ckpt']!r} does not exist.")
    token = hub_token()
    user = hub_user(token)  # no network, offline mode or a refused token: known before the folder is built
    print(f"Hugging Face Hub: signed in as {user}")
    if opts["out"]:
        return _push(opts, repo_id, token, private, output_dir(opts["out"]))
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as folder:
        return _push(opts, repo_id, token, private, Path(folder))


def _push(opts: dict, repo_id: str, token: str, private: bool, out: Path) -> int:
    from finetune.commands.model import _parity_images
    from finetune.use.hub import hub_folder, upload
    from finetune.use.load import load

    model = load(opts["ckpt"])
    rule = decision_rule_from(opts, model)
    images, where = _parity_images(model, opts["input"])
    folder = hub_folder(model, opts["ckpt"], out, model.preprocess(images), float(opts["tolerance"]), rule, repo_id)
    print(
        f"built {out}: {', '.join(folder.files)}\n  parity on {len(images)} {where} through "
        f"timm.create_model('local-dir:...'): max |logit difference| = {folder.export.max_abs_diff:.2e}"
    )
    url, commit = upload(
        folder,
        repo_id,
        token,
        private,
        f"Upload {model.config['backbone']['name']} fine-tuned on {len(model.classes)} classes",
    )
    print(
        f"pushed {repo_id}: {url}"
        + (f" (commit {commit[:8]})" if commit else "")
        + f"\n  load: timm.create_model('hf-hub:{repo_id}', pretrained=True)"
    )
    return 0
