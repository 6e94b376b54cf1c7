"""The Hub folder (``finetune export format=hub``), its model card, and ``finetune push``: a tiny
real timm model trained on generated folders, read back by timm from the folder and checked on
the real hymenoptera photos; push run as a subprocess against loopback endpoints (no Hub here)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import REPO, fit_tiny_on_folders

from finetune import load
from finetune.commands import export_command
from finetune.errors import ConfigError
from finetune.model.backbone import build_backbone
from finetune.model.build import build_model
from finetune.use.export import export
from finetune.use.hub import HubError, check_repo_id, hub_folder, upload
from finetune.use.load import FinetunedModel
from finetune.use.model_card import base_model, write_model_card


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TINY run (test_resnet, 3 classes, 8 train / 4 val images each) and its hub folder."""
    root = tmp_path_factory.mktemp("hub")
    result = fit_tiny_on_folders(root, 8, 4, extra=("viz=default",))
    folder = root / "hub"
    assert (
        export_command(
            [f"ckpt={result.best_checkpoint}", "format=hub", f"out={folder}", f"input={root / 'data' / 'val'}"]
        )
        == 0
    )
    return result, folder


def real_photos(hymenoptera: Path, per_class: int = 8) -> list[Path]:
    return [p for c in ("ants", "bees") for p in sorted((hymenoptera / "val" / c).glob("*.jpg"))[:per_class]]


def test_timm_local_dir_gives_finetune_loads_logits_on_real_photos(trained, hymenoptera):
    result, folder = trained
    model = load(result.best_checkpoint)
    photos = real_photos(hymenoptera)
    batch = model.preprocess(photos)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        expected, got = model.model(batch), reloaded(batch)
    assert got.shape == (16, 3)
    assert (got - expected).abs().max() <= 1e-4
    # The same numbers are not the untrained network's: the weights came from the folder.
    fresh = timm.create_model("test_resnet", num_classes=3).eval()
    with torch.no_grad():
        assert (fresh(batch) - expected).abs().max() > 1e-2


def test_config_json_is_timms_hub_layout_with_finetunes_preprocessing(trained):
    result, folder = trained
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == result.classes
    cfg = config["pretrained_cfg"]
    assert cfg["num_classes"] == 3 and cfg["input_size"] == [3, 32, 32]  # data.image_size=32, not the native 160
    model = load(result.best_checkpoint)
    assert cfg["interpolation"] == model.data_config["interpolation"]
    for key in ("mean", "std", "crop_pct"):
        assert cfg[key] == pytest.approx(model.data_config[key])
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert reloaded.pretrained_cfg["label_names"] == result.classes
    resolved = timm.data.resolve_model_data_config(reloaded)
    assert (
        tuple(resolved["input_size"]) == (3, 32, 32) and resolved["interpolation"] == model.data_config["interpolation"]
    )
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    assert preprocessing["classes"] == result.classes and preprocessing["temperature"] == pytest.approx(
        model.temperature
    )


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_states_the_runs_own_numbers(trained):
    result, folder = trained
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "timm", "finetune"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # random weights; the owner picks a license
    summary = json.loads((result.output_dir / "summary.json").read_text())
    counts = summary["data"]["counts"]
    for name in result.classes:  # the table row of each class: its count in every split shown
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert row == f"| {name} | " + " | ".join(str(counts[s][name]) for s in ("train", "val")) + " |"
    n = summary["data"]["images"]["val"]
    assert n == 12
    right = round(summary["metrics"]["val/acc"] * n)
    assert f"| val | accuracy | {summary['metrics']['val/acc']:.4f} ({right}/{n}) | {n} |" in card
    assert f"The validation split holds {n} images" in card and "Wilson" in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert "confusion.png" in links and "curves.png" in links
    for link in links:
        assert not Path(link).is_absolute() and (folder / link).is_file()
    assert 'timm.create_model("hf-hub:' in card and "finetune.load" in card and str(result.output_dir) not in card


def test_a_card_without_its_run_folder_says_so_instead_of_inventing(trained, tmp_path):
    result, _ = trained
    lone = tmp_path / "model.ckpt"
    shutil.copyfile(result.best_checkpoint, lone)
    card = write_model_card(load(lone), lone, tmp_path, repo_id="alice/tiny")
    text = card.readme.read_text()
    assert card.pictures == [] and "![" not in text
    assert text.count("Not stated:") == 2 and "| val | accuracy" not in text
    assert "# tiny" in text and "hf-hub:alice/tiny" in text


def test_card_lists_skipped_files_and_duplicates_by_name_and_only_the_best_checkpoints_metrics(trained, tmp_path):
    result, _ = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(result.output_dir / "viz", run / "viz")
    for name in ("best.ckpt", "last.ckpt"):
        shutil.copyfile(result.best_checkpoint, run / "checkpoints" / name)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    summary["best_checkpoint"] = "/elsewhere/run/checkpoints/best.ckpt"  # a run folder that moved
    summary["data"] |= {
        "skipped": [["/home/alice/data/train/ants/broken.jpg", "cannot decode"]],
        "duplicates": [["/home/alice/data/train/bees/b1.jpg", "/home/alice/data/val/bees/b9.jpg"]],
        "warnings": ["1 near-blank image: /home/alice/data/train/ants/blank.png"],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    model = load(result.best_checkpoint)
    text = write_model_card(model, run / "checkpoints" / "best.ckpt", tmp_path).readme.read_text()
    assert "- Skipped files (unreadable or not images): 1 (broken.jpg: cannot decode)" in text
    assert "(b1.jpg = b9.jpg)" in text and "near-blank image: blank.png" in text and "/home/alice" not in text
    assert "1 validation or test images have an identical copy in training" in text
    assert "| val | accuracy |" in text
    # last.ckpt: summary.json's metrics and the pictures of the best model are not its own.
    (tmp_path / "last").mkdir()
    last = write_model_card(model, run / "checkpoints" / "last.ckpt", tmp_path / "last")
    text = last.readme.read_text()
    assert "| val | accuracy |" not in text and "not this one" in text
    assert [p.name for p in last.pictures] == ["curves.png"] and "confusion.png" not in text


def test_base_model_is_named_only_for_timm_hub_weights():
    assert base_model({"backbone": {"name": "resnet50", "weights": "pretrained"}}) == "timm/resnet50.a1_in1k"
    assert base_model({"backbone": {"name": "resnet50.tv_in1k", "weights": "hub"}}) == "timm/resnet50.tv_in1k"
    assert base_model({"backbone": {"name": "tf_efficientnet_lite0", "weights": "pretrained"}}) is None  # embedded
    assert base_model({"backbone": {"name": "resnet50", "weights": "random"}}) is None
    assert base_model({"backbone": {"name": "resnet50", "weights": "/data/w.safetensors"}}) is None


def untrained(name: str, hidden: int | None = None, pool: str | None = None) -> FinetunedModel:
    backbone = build_backbone(name, "random", global_pool=pool, image_size=32)
    head = {"hidden": hidden, "dropout": 0.0, "norm": None, "pool": pool}
    freeze = {"groups": [], "until": None, "patterns": [], "batchnorm": "eval"}
    model = build_model(backbone, 3, head, freeze)
    config = {"backbone": {"name": name, "weights": "random"}, "head": head, "data": {"image_size": 32}}
    return FinetunedModel(model, ["a", "b", "c"], backbone.data_config, config)


@pytest.mark.parametrize(
    "name, hidden, pool, why",
    [
        ("test_resnet", 16, None, "MLP"),
        ("test_resnet", None, "max", "head.pool=max"),
        ("lenet5", None, None, "lenet5 is not a timm model"),
    ],
)
def test_hub_refuses_what_timm_cannot_load_before_writing(tmp_path, name, hidden, pool, why):
    model = untrained(name, hidden, pool)
    with pytest.raises(ConfigError) as err:
        export(model, "hub", tmp_path / "out", torch.zeros(2, 3, 32, 32))
    message = str(err.value)
    assert why in message and "format=safetensors" in message and "format=onnx" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_repo_id_must_be_org_slash_name():
    assert check_repo_id("alice/ants-vs-bees") == "alice/ants-vs-bees"
    for bad in ("ants", "a/b/c", "alice/ants vs bees", "-alice/x", "alice/x--y", ""):
        with pytest.raises(ConfigError, match="ORG/NAME"):
            check_repo_id(bad)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_hub():
    """A loopback 'Hub' that records each request and answers 401, as the Hub does for a bad token."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            requests.append(self.path)
            body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def push(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """``finetune push ARGS`` as a user runs it, with a fresh HF_HOME (no cached login)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean |= {"HF_HOME": str(tmp_path / "hf_home"), **env}
    return subprocess.run(
        [sys.executable, "-m", "finetune", "push", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=REPO,
        timeout=300,
    )


def assert_failed_in_one_line(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "pushed " not in run.stdout


def test_push_to_an_unreachable_hub_fails_in_one_line(trained, tmp_path):
    result, _ = trained
    port = closed_port()
    run = push(
        [f"ckpt={result.best_checkpoint}", "repo_id=alice/tiny"],
        tmp_path,
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_TOKEN="dummy",
    )
    assert_failed_in_one_line(run, "cannot reach the Hugging Face Hub", f"127.0.0.1:{port}", "nothing was pushed")


def test_push_without_a_token_says_how_to_get_one(trained, tmp_path):
    result, _ = trained
    run = push([f"ckpt={result.best_checkpoint}", "repo_id=alice/tiny"], tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert_failed_in_one_line(run, "no Hugging Face token", "HF_TOKEN", "hf auth login")


def test_push_with_a_refused_token_and_a_bad_repo_id(trained, tmp_path, fake_hub):
    result, _ = trained
    endpoint, requests = fake_hub
    run = push([f"ckpt={result.best_checkpoint}", "repo_id=tiny"], tmp_path, HF_ENDPOINT=endpoint, HF_TOKEN="hf_x")
    assert_failed_in_one_line(run, "repo_id='tiny'", "ORG/NAME")
    assert requests == []  # refused before any network
    run = push(
        [f"ckpt={result.best_checkpoint}", "repo_id=alice/tiny"], tmp_path, HF_ENDPOINT=endpoint, HF_TOKEN="hf_x"
    )
    assert_failed_in_one_line(run, "refused the token", "401")
    # The token is checked before the folder is built: nothing was created or uploaded.
    assert "/api/whoami-v2" in requests and not any("/repos/" in r or "/commit/" in r for r in requests)


class RecordingApi:
    """huggingface_hub.HfApi's calls push makes, recorded; `public` says whether the repo exists public."""

    calls: list = []
    public = False

    def __init__(self, token=None, library_name=None):
        self.endpoint = "https://hub.test"

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (str,), {"repo_id": repo_id, "url": f"https://hub.test/{repo_id}"})(repo_id)

    def repo_info(self, repo_id):
        self.calls.append(("repo_info", repo_id))
        return type("Info", (), {"private": not self.public})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"oid": "0123456789abcdef"})()


def test_upload_is_one_commit_of_exactly_the_folders_files(trained, tmp_path, monkeypatch):
    import huggingface_hub

    result, _ = trained
    model = load(result.best_checkpoint)
    (tmp_path / "stale.png").write_bytes(b"from an older export")
    folder = hub_folder(model, result.best_checkpoint, tmp_path, torch.zeros(2, 3, 32, 32), repo_id="alice/tiny")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls, RecordingApi.public = [], False
    assert upload(folder, "alice/tiny", "token", private=True) == ("https://hub.test/alice/tiny", "0123456789abcdef")
    uploads = [c[1] for c in RecordingApi.calls if c[0] == "upload_folder"]
    assert len(uploads) == 1 and uploads[0]["folder_path"] == str(tmp_path)
    assert sorted(uploads[0]["allow_patterns"]) == sorted(folder.files) and "stale.png" not in folder.files
    assert {"model.safetensors", "config.json", "preprocessing.json", "README.md", "confusion.png"} <= set(folder.files)
    # private=true on a repository that exists and is public: refused, nothing uploaded.
    RecordingApi.calls, RecordingApi.public = [], True
    with pytest.raises(HubError, match="exists and is public"):
        upload(folder, "alice/tiny", "token", private=True)
    assert [c[0] for c in RecordingApi.calls] == ["create_repo", "repo_info"]
