"""Beyond plain SE: ECA/CBAM/ESE, per-stage targeting, user recipe files and user models, and `compare`."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats
from typer.testing import CliRunner

import se_inject
from se_inject import NoSitesError
from se_inject.cli.commands import app
from se_inject.io.export import timm_architecture
from se_inject.layers.eca import eca_kernel_size
from se_inject.names import VARIANTS
from se_inject.tools.compare import compare_variants

runner = CliRunner()


def _analytic_params(kind: str, c: int, rd: int, k: int, bias: bool = True) -> int:
    return {
        "se": 2 * c * rd + (rd + c if bias else 0),
        "eca": k,
        "cbam": 2 * c * rd + (rd + c if bias else 0) + 2 * 7 * 7 + 2,  # shared MLP, 7x7 conv (no bias), BN affine
        "cbam-timm": 2 * c * rd + 2 * 7 * 7 + 2,  # timm's CbamModule: no MLP biases
        "ese": c * c + (c if bias else 0),
    }[kind]


def _analytic_elementwise(kind: str, c: int, h: int, w: int, rd: int) -> int:
    chw, hw = c * h * w, h * w
    return {
        "se": chw + rd + c + chw,  # pool, ReLU, sigmoid, scale
        "eca": chw + c + chw,  # pool, sigmoid, scale
        "cbam": (2 * chw + 2 * rd + c + c + chw) + (2 * chw + hw + hw + chw),  # channel part, spatial part
        "cbam-timm": (2 * chw + 2 * rd + c + c + chw) + (2 * chw + hw + hw + chw),
        "ese": chw + c + chw,
    }[kind]


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_variant_counts_on_resnet50_are_analytic(kind):
    _injected, report = se_inject.inject("timm:resnet50", se_inject.Settings(attn_layer=kind), device="meta", seed=0)
    sites = report.plan.sites
    assert len(sites) == 16
    analytic = sum(_analytic_params(kind, s.channels, s.squeeze_channels, s.attention.kernel_size) for s in sites)
    assert report.after.params - report.before.params == analytic
    for row in report.site_rows():
        c, h, w = row["feature_map"]
        assert row["elementwise_ops"] == _analytic_elementwise(kind, c, h, w, row["squeeze_channels"])
    assert report.to_dict()["se_elementwise_ops"] == sum(r["elementwise_ops"] for r in report.site_rows())


def test_variant_macs_are_analytic():
    _, eca = se_inject.inject("timm:resnet50", se_inject.Settings(attn_layer="eca"), device="meta", seed=0)
    assert eca.to_dict()["macs"]["delta"] == sum(s.channels * s.attention.kernel_size for s in eca.plan.sites)
    _, cbam = se_inject.inject("timm:resnet50", se_inject.Settings(attn_layer="cbam"), device="meta", seed=0)
    assert cbam.to_dict()["macs"]["delta"] == sum(
        4 * s.channels * s.squeeze_channels + 2 * 49 * cbam.feature_maps[s.path][1] * cbam.feature_maps[s.path][2]
        for s in cbam.plan.sites)


@pytest.mark.parametrize(("channels", "k"), [(64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_size(channels, k):
    assert eca_kernel_size(channels) == k


@pytest.mark.parametrize("name", ["resnet26t", pytest.param("resnet50d", marks=pytest.mark.slow)])
def test_eca_on_timm_resnet_is_timms_ecaresnet(name):
    injected, report = se_inject.inject(f"timm:{name}", se_inject.Settings(attn_layer="eca"), device="meta", seed=0)
    with torch.device("meta"):
        reference = timm.create_model(f"eca{name}")
    assert {k: v.shape for k, v in injected.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert timm_architecture(report.plan) == f"eca{name}"


def test_ese_defaults_to_hard_sigmoid_and_gate_overrides():
    _, ese = se_inject.inject("timm:test_resnet", se_inject.Settings(attn_layer="ese"), device="meta", seed=0)
    assert {s.attention.gate_layer for s in ese.plan.sites} == {"hard-sigmoid"}
    _, se = se_inject.inject("timm:test_resnet", se_inject.Settings(gate_layer="hard-sigmoid"), device="meta", seed=0)
    assert {s.attention.gate_layer for s in se.plan.sites} == {"hard-sigmoid"}
    injected, _ = se_inject.inject("timm:test_resnet", se_inject.Settings(gate_layer="hard-sigmoid"), seed=0)
    assert isinstance(injected.layer1[0].se.gate, torch.nn.Hardsigmoid)


MODELS_BY_RECIPE = [("timm", "test_resnet"), ("torchvision", "mobilenet_v2"), ("torchvision", "googlenet")]
EXPORT_CASES = [  # one recipe in the default suite; the scripting and export of the bigger two take ~20 s: slow
    pytest.param(source, name, marks=[pytest.mark.slow] if name != "test_resnet" else [])
    for source, name in MODELS_BY_RECIPE
]


def _variant_model(kind: str, source: str, name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    model = randomize_norm_stats(model).eval()
    injected, _ = se_inject.inject(model, se_inject.Settings(attn_layer=kind, init="identity"), seed=0)
    return model, injected.eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("kind", ["se", "cbam", *(pytest.param(k, marks=pytest.mark.slow) for k in ("eca", "ese"))])
@pytest.mark.parametrize(("source", "name"), [  # GoogLeNet (a minute on a CPU for the four variants): slow
    pytest.param(source, name, marks=[pytest.mark.slow] if name == "googlenet" else [])
    for source, name in MODELS_BY_RECIPE])
def test_every_variant_with_every_recipe(kind, source, name):
    model, injected, x = _variant_model(kind, source, name)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(injected(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kind", ["se", *(pytest.param(k, marks=pytest.mark.slow) for k in VARIANTS if k != "se")])
@pytest.mark.parametrize(("source", "name"), EXPORT_CASES)
def test_every_variant_exports_with_every_recipe(kind, source, name):
    _, injected, x = _variant_model(kind, source, name)
    with torch.no_grad():
        scripted = torch.jit.script(injected)
        out = scripted(x)
        out = out if isinstance(out, torch.Tensor) else out.logits  # scripted GoogLeNet returns its namedtuple
        assert torch.allclose(out, injected(x), atol=1e-5)
    program = torch.export.export(injected, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), injected(x), atol=1e-5)


@pytest.mark.slow
def test_stage_ablation_on_resnet50():
    """SE paper, Table 9-style ablations: one stage only, or all but the last (~10% -> ~4% extra parameters)."""
    _, everywhere = se_inject.inject("timm:resnet50", device="meta", seed=0)
    _, stage3 = se_inject.inject("timm:resnet50", se_inject.Settings(include=["layer3.*"]), device="meta", seed=0)
    _, no_last = se_inject.inject("timm:resnet50", se_inject.Settings(exclude=["layer4.*"]), device="meta", seed=0)
    assert [s.path for s in stage3.plan.sites] == [f"layer3.{i}" for i in range(6)]
    assert len(no_last.plan.sites) == 13
    ratio = lambda r: r.to_dict()["params"]["delta"] / r.to_dict()["params"]["before"]  # noqa: E731
    assert 0.095 < ratio(everywhere) < 0.105
    assert 0.03 < ratio(no_last) < 0.045
    per_site = {s.path: p for s, p in zip(everywhere.plan.sites, everywhere.site_params.values(), strict=True)}
    assert stage3.to_dict()["params"]["delta"] == sum(v for k, v in per_site.items() if k.startswith("layer3."))


def test_min_channels_and_empty_filters():
    _, wide = se_inject.inject("timm:resnet50", se_inject.Settings(min_channels=1024), device="meta", seed=0)
    assert {s.channels for s in wide.plan.sites} == {1024, 2048}
    with pytest.raises(NoSitesError, match="filters removed all 16 sites") as info:
        se_inject.inject("timm:resnet50", se_inject.Settings(include=["stage9.*"]), device="meta")
    assert "layer1.0" in str(info.value)
    result = runner.invoke(app, ["resnet50", "--dry-run", "--include", "nothing*"])
    assert result.exit_code == 1 and "layer1.0" in result.stderr


TOY = '''
import torch
from torch import nn


class ToyBlock(nn.Module):
    """A residual block of the user's own: conv -> bn -> (SE here) -> + x."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.Sequential(ToyBlock(32), ToyBlock(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def make():
    return ToyNet()
'''

RECIPE = '''
name = "toy-residual"
description = "SE after the toy block's norm, before its addition"

[defaults]
reduction = 4

[[blocks]]
classes = ["toymodels.ToyBlock"]
after = "bn"
'''


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "toymodels.py").write_text(TOY)
    (tmp_path / "toy.toml").write_text(RECIPE)
    return tmp_path


def test_user_model_and_recipe_file_through_save_and_load(toy, tmp_path):
    spec = f"{toy / 'toymodels.py'}:make"
    model, report = se_inject.inject(spec, recipes=[toy / "toy.toml"], input_size=32, seed=0)
    assert [(s.path, s.recipe, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        ("blocks.0", "toy-residual", 32, 8), ("blocks.1", "toy-residual", 32, 8)]
    se_inject.save(model, report.plan, tmp_path / "out")
    with pytest.raises(se_inject.CheckpointError, match="trust_code=True"):  # code named by a folder never runs
        se_inject.load(tmp_path / "out")
    loaded = se_inject.load(tmp_path / "out", trust_code=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_user_model_cli_and_module_factory(toy, tmp_path, monkeypatch):
    result = runner.invoke(app, [f"{toy / 'toymodels.py'}:make", "--recipe-file", str(toy / "toy.toml"),
                                 "--input-size", "32", "--json", "-o", str(tmp_path / "o"), "--seed", "0"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sites"][0]["recipe"] == "toy-residual"
    monkeypatch.syspath_prepend(str(toy))
    _, report = se_inject.inject("toymodels:make", recipes=[toy / "toy.toml"], input_size=32, device="meta")
    assert str(report.plan.model) == "python:toymodels:make"
    _, tv = se_inject.inject("torchvision.models:resnet18", device="meta", seed=0)
    assert len(tv.plan.sites) == 8


@pytest.mark.parametrize(("args", "text"), [
    (["nope.py:make"], "unknown model"),
    (["toymodels.py:not_there"], "no function 'not_there'"),
    (["toymodels.py:make", "--recipe-file", "missing.toml"], "missing.toml: no such file"),
])
def test_user_model_errors(toy, monkeypatch, args, text):
    monkeypatch.chdir(toy)
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code in (1, 2)
    assert text in result.stderr


def test_malformed_recipe_file_from_the_cli(toy):
    bad = toy / "bad.toml"
    bad.write_text(RECIPE.replace("reduction = 4", "reduction = 'four'"))
    result = runner.invoke(app, ["resnet18", "--dry-run", "--recipe-file", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.stderr and "defaults.reduction" in result.stderr


def test_compare_rows():
    rows = compare_variants("timm:test_resnet")
    assert [r.attention for r in rows] == list(VARIANTS)
    by = {r.attention: r for r in rows}
    # ECA has no FC layers; CBAM's MLP is C // 16 wide (its authors' code), SE's C/16 to a multiple of 8 (timm), so
    # on test_resnet's narrow stages CBAM can be the smaller of the two
    assert by["eca"].params_delta < min(by["se"].params_delta, by["cbam"].params_delta)
    assert all(r.sites == 4 and not r.latency for r in rows)


@pytest.mark.slow
def test_compare_bench_cli():
    result = runner.invoke(app, ["compare", "timm:test_resnet", "--attention", "se", "--attention", "eca", "--bench",
                                 "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["attention"] for r in rows] == ["se", "eca"]
    assert [t["batch"] for t in rows[0]["latency"]] == [1, 8]
    assert all(t["base_ms"] > 0 and t["injected_ms"] > 0 for r in rows for t in r["latency"])


def test_variants_listing():
    result = runner.invoke(app, ["variants", "--json"])
    assert result.exit_code == 0
    assert [v["name"] for v in json.loads(result.stdout)] == ["se", "eca", "cbam", "cbam-timm", "ese"]
    assert se_inject.list_attention() == list(VARIANTS)
