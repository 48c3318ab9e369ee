"""Pretrained weights by name through timm's and torchvision's own caches, offline: the tests place a small model's
weights where each library's cache finds them, and refuse any network access."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app
from se_inject.engine.models import ModelSpec, resolve_model
from se_inject.errors import UnknownModelError, WeightsError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline as huggingface_hub understands it, and any socket use is a test failure."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache (TORCH_HOME), where torchvision and timm's URL weights are looked up."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, where timm's hub weights are looked up."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def place_in_hf_cache(cache, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/REVISION/FILE}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / revision / "model.safetensors"))


def test_names_carry_weights_tags():
    assert resolve_model("resnet50.a1_in1k") == ModelSpec("timm", "resnet50.a1_in1k")
    assert resolve_model("resnet50.IMAGENET1K_V2") == ModelSpec("torchvision", "resnet50.IMAGENET1K_V2")
    assert resolve_model("torchvision:resnet50.DEFAULT") == ModelSpec("torchvision", "resnet50.IMAGENET1K_V2")
    assert resolve_model("timm:test_resnet.r160_in1k") == ModelSpec("timm", "test_resnet.r160_in1k")
    with pytest.raises(UnknownModelError, match="IMAGENET1K_V1"):
        resolve_model("torchvision:resnet50.IMAGENET1K_V9")
    with pytest.raises(UnknownModelError, match="a1_in1k"):
        resolve_model("resnet50.nope")


def test_timm_weights_from_the_hub_cache(hf_cache):
    source = randomize_norm_stats(timm.create_model("test_resnet"))
    place_in_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", source.state_dict())
    model, report = se_inject.inject("test_resnet", se_inject.Settings(init="identity"), pretrained=True, seed=0,
                                     input_size=64)
    assert report.model == "timm:test_resnet.r160_in1k"  # the default tag, resolved and recorded
    assert report.pretrained == "timm/test_resnet.r160_in1k"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # the base weights are the cached file's
    assert report.drift is not None and report.drift.relative_l2 == 0.0  # as with --weights; identity: no drift


def test_torchvision_weights_from_the_torch_hub_cache(torch_home, tmp_path):
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    source = randomize_norm_stats(torchvision.models.mobilenet_v2())
    torch_home.mkdir(parents=True)
    torch.save(source.state_dict(), torch_home / weights.url.rsplit("/", 1)[-1])
    model, report = se_inject.inject("torchvision:mobilenet_v2.IMAGENET1K_V2", pretrained=True, seed=0,
                                     input_size=64)
    assert report.pretrained == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    assert report.drift is not None and report.drift.relative_l2 > 0  # paper init moves the outputs


@pytest.mark.parametrize("name", ["test_resnet", "torchvision:resnet18"])
def test_missing_weights_fail_at_once_naming_the_cache(hf_cache, torch_home, name, monkeypatch):
    built = []
    monkeypatch.setattr(se_inject.api, "build_model", lambda *a, **k: built.append(a) or None)
    with pytest.raises(WeightsError, match="not in the cache") as error:
        se_inject.inject(name, pretrained=True)
    assert str(hf_cache if name == "test_resnet" else torch_home) in str(error.value)
    assert "HF_HUB_OFFLINE" in str(error.value)
    assert built == []  # refused before any model was built


def test_cli_pretrained_missing_is_one_line_exit_1(hf_cache):
    result = CliRunner().invoke(app, ["test_resnet", "--pretrained", "--dry-run"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(hf_cache) in lines[0] and "Traceback" not in result.stderr


def test_pretrained_excludes_weights_file(tmp_path):
    with pytest.raises(se_inject.UsageError, match="exclude"):
        se_inject.inject("test_resnet", pretrained=True, weights=tmp_path / "w.safetensors")


def test_config_json_describes_torchvision_weights(tmp_path):
    """A torchvision ResNet + SE is timm's seresnet architecture, but not its preprocessing: the config says
    what torchvision's weights use (bilinear, resize 256 -> crop 224) and nothing of seresnet's weights."""
    model, report = se_inject.inject("torchvision:resnet18", seed=0)
    final = se_inject.save(model, report, tmp_path / "out")
    assert final.timm_architecture == "seresnet18"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == pytest.approx(224 / 256)
    assert cfg["input_size"] == [3, 224, 224] and cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert not {"license", "paper_ids", "test_input_size", "hf_hub_id", "url"} & set(cfg)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert loaded.pretrained_cfg["interpolation"] == "bilinear"
    assert timm.data.resolve_data_config({}, model=loaded)["crop_pct"] == pytest.approx(224 / 256)


def test_a_tag_without_pretrained_says_the_weights_are_random():
    _, report = se_inject.inject("resnet50.a1_in1k", device="meta", seed=0)
    assert report.pretrained is None
    assert any("random weights" in note and "--pretrained" in note for note in report.notes)


@pytest.mark.slow
def test_hf_home_is_the_cache_in_a_fresh_process(tmp_path):
    """End to end, as a user configures it: HF_HOME names the cache, HF_HUB_OFFLINE=1 keeps the hub quiet."""
    state = timm.create_model("test_resnet").state_dict()
    place_in_hf_cache(tmp_path / "hf" / "hub", "timm/test_resnet.r160_in1k", state)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "se_inject", "test_resnet", "--pretrained", "--dry-run", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pretrained"] == "timm/test_resnet.r160_in1k"
