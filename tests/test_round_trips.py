"""Every model spelling the CLI accepts saves, loads back and exports: bare names, ``timm:``/``torchvision:``, weights
tags (which only name weights unless ``--pretrained``), ``--pretrained`` from a local cache, and the user's own code
with ``--trust-code``. Nothing is downloaded: pretrained weights are files placed in a temporary cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import hf_cache
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app
from se_inject.layers.attention import attention_classes

runner = CliRunner()

FACTORY = "def make():\n    import timm\n    return timm.create_model('test_resnet')\n"


def cli(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "300"})


def round_trip(name: str, out: Path, *extra: str, trust: bool = False) -> dict:
    """`se-inject NAME -o OUT`, then load it with the library, then `se-inject export OUT`: all succeed and agree."""
    result = cli(name, "-o", str(out), "--input-size", "32", "--seed", "0", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    loaded = se_inject.load(out, trust_code=trust)
    sites = [m for m in loaded.modules() if isinstance(m, attention_classes())]
    assert len(sites) == len(report["sites"]) > 0
    exported = cli("export", str(out), "-f", "torchscript", *(["--trust-code"] if trust else []))
    assert exported.exit_code == 0, exported.stderr
    scripted = torch.jit.load(str(out / "model.pt"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), loaded(x))
    return report


@pytest.mark.parametrize(("name", "model"), [
    ("test_resnet", "timm:test_resnet"),
    pytest.param("timm:test_resnet", "timm:test_resnet", marks=pytest.mark.slow),
    pytest.param("test_resnet.r160_in1k", "timm:test_resnet.r160_in1k", marks=pytest.mark.slow),
    pytest.param("timm:test_resnet.r160_in1k", "timm:test_resnet.r160_in1k", marks=pytest.mark.slow),
    pytest.param("torchvision:resnet18.IMAGENET1K_V1", "torchvision:resnet18.IMAGENET1K_V1", marks=pytest.mark.slow),
    pytest.param("torchvision:resnet18", "torchvision:resnet18", marks=pytest.mark.slow),
    pytest.param("torchvision:resnet18.DEFAULT", "torchvision:resnet18.IMAGENET1K_V1", marks=pytest.mark.slow),
    pytest.param("resnet18.IMAGENET1K_V1", "torchvision:resnet18.IMAGENET1K_V1", marks=pytest.mark.slow),
])
def test_registry_spellings_round_trip(tmp_path, name, model):
    report = round_trip(name, tmp_path / "o")
    assert report["model"] == model
    assert se_inject.io.checkpoint.read_plan(tmp_path / "o").model.name == model.split(":", 1)[1]


@pytest.mark.slow
def test_code_spellings_round_trip_with_trust_code(tmp_path, monkeypatch):
    (tmp_path / "mynets_rt.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    round_trip(f"{tmp_path / 'mynets_rt.py'}:make", tmp_path / "file", trust=True)
    round_trip("mynets_rt:make", tmp_path / "module", trust=True)
    # without --trust-code the folder's code is not run: the user is told how to opt in
    refused = cli("export", str(tmp_path / "module"), "-f", "onnx")
    assert refused.exit_code == 1 and "--trust-code" in refused.stderr



def test_pretrained_timm_tag_from_a_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    weights = {k: torch.rand(v.shape) + 0.5 if v.is_floating_point() else v  # positive: BN variances
               for k, v in timm.create_model("test_resnet").state_dict().items()}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k",
                                                                 weights)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a miss fails at once instead of downloading
    report = round_trip("timm:test_resnet.r160_in1k", tmp_path / "o", "--pretrained")
    assert report["pretrained"]
    loaded = se_inject.load(tmp_path / "o").state_dict()
    key = next(k for k, v in weights.items() if v.dim() == 4)  # the stem's first convolution
    assert torch.equal(loaded[key], weights[key])  # the cached weights, not random ones


@pytest.mark.slow
def test_pretrained_torchvision_tag_from_a_local_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    report = round_trip("torchvision:resnet18.IMAGENET1K_V1", tmp_path / "o", "--pretrained")
    assert report["model"] == "torchvision:resnet18.IMAGENET1K_V1" and report["pretrained"]
    assert torch.equal(se_inject.load(tmp_path / "o").state_dict()["conv1.weight"], state["conv1.weight"])
