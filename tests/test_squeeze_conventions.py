"""The squeeze width of inverted residuals follows the model family's own SE convention; SE-MobileNet (Table 3)."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models._efficientnet_builder import round_channels
from torchvision.models._utils import _make_divisible
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app
from se_inject.engine.models import build_model, resolve_model


def _meta(name: str) -> torch.nn.Module:
    return build_model(resolve_model(name), device="meta")


def test_efficientnet_lite0_gets_exactly_efficientnet_b0s_se():
    injected, report = se_inject.inject("timm:efficientnet_lite0", device="meta", seed=0)
    ours = {k: tuple(v.shape) for k, v in injected.state_dict().items() if ".se." in k}
    b0 = {k: tuple(v.shape) for k, v in _meta("timm:efficientnet_b0").state_dict().items() if ".se." in k}
    assert ours == b0 and len(ours) == 64  # key for key, shape for shape
    assert any("EfficientNet: block input channels" in n for n in report.notes)


@pytest.mark.parametrize("reduction", [8, 3])
def test_reduction_divides_the_block_input_width_in_efficientnet_models(reduction):
    _, report = se_inject.inject("timm:efficientnet_lite0", se_inject.Settings(rd_ratio=1 / reduction), device="meta",
                                 seed=0)
    model = _meta("timm:efficientnet_lite0")
    blocks = [model.get_submodule(s.path) for s in report.plan.sites]
    # inverted residual: input of the expansion conv; depthwise-separable: input of the depthwise conv
    inputs = [b.conv_pw.in_channels if hasattr(b, "conv_pwl") else b.conv_dw.in_channels for b in blocks]
    assert [s.squeeze_channels for s in report.plan.sites] == [max(1, round(c / reduction)) for c in inputs]
    if reduction == 3:  # widths rounded up (32 / 3, 80 / 3): rounding, not floor division
        assert any(c % reduction * 2 > reduction for c in inputs)


def test_timm_mobilenetv3_fill_follows_its_own_se():
    _, report = se_inject.inject("timm:mobilenetv3_large_100", se_inject.Settings(fill=True), device="meta", seed=0)
    model = _meta("timm:mobilenetv3_large_100")
    assert report.plan.sites
    for site in report.plan.sites:
        assert site.squeeze_channels == round_channels(site.channels * 0.25)  # timm's own rule, expanded width
    own = [m for m in model.modules() if type(m).__name__ == "SqueezeExcite"]
    assert all(m.conv_reduce.out_channels == round_channels(m.conv_reduce.in_channels * 0.25) for m in own)


def test_torchvision_mobilenet_v3_fill_follows_its_own_se():
    _, report = se_inject.inject("torchvision:mobilenet_v3_large", se_inject.Settings(fill=True), device="meta", seed=0)
    assert [s.squeeze_channels for s in report.plan.sites] == [
        _make_divisible(s.channels // 4, 8) for s in report.plan.sites]


def test_torchvision_efficientnet_v2_fill_follows_its_own_se():
    _, report = se_inject.inject("torchvision:efficientnet_v2_s", se_inject.Settings(fill=True), device="meta", seed=0)
    model = _meta("torchvision:efficientnet_v2_s")
    for site in report.plan.sites:
        block = model.get_submodule(site.path)
        assert site.squeeze_channels == max(1, block.block[0][0].in_channels // 4)  # MBConv's input_channels // 4


def test_se_mobilenet_matches_table_3():
    base = _meta("timm:mobilenetv1_100")
    _, report = se_inject.inject("timm:mobilenetv1_100", device="meta", seed=0)
    assert report.plan.recipes == ("mobilenet-v1",)
    assert round(report.before.params / 1e6, 1) == 4.2 and round(report.after.params / 1e6, 1) == 4.7
    blocks = [p for p, m in base.named_modules() if type(m).__name__ == "DepthwiseSeparableConv"]
    assert [s.path for s in report.plan.sites] == blocks and len(blocks) == 13
    # on each block's output width (after the pointwise conv), not its depthwise width
    assert [s.channels for s in report.plan.sites] == [base.get_submodule(p).conv_pw.out_channels for p in blocks]


def test_se_mobilenet_takes_the_pointwise_output():
    model = build_model(resolve_model("timm:mobilenetv1_100")).eval()
    injected, _ = se_inject.inject(model, seed=0, input_size=64)
    block = injected.blocks[1][0]
    seen = {}
    block.bn2.register_forward_hook(lambda _m, _a, out: seen.update(bn2=out.clone()))
    block.attn_last.register_forward_pre_hook(lambda _m, args: seen.update(se=args[0].clone()))
    with torch.no_grad():
        injected(torch.randn(1, 3, 64, 64))
    assert torch.equal(seen["se"], seen["bn2"])


@pytest.mark.parametrize("name", ["timm:efficientnet_lite0", "timm:mobilenetv2_100"])
def test_first_separable_block_of_efficientnet_style_networks_keeps_timms_place(name):
    _, report = se_inject.inject(name, device="meta", seed=0)
    first = report.plan.sites[0]
    assert first.recipe == "inverted-residual" and first.slot == "se"


def test_recipes_listing_names_the_conventions():
    listed = CliRunner().invoke(app, ["recipes", "--json"])
    data = {r["name"]: r for r in json.loads(listed.stdout)}
    conventions = data["inverted-residual"]["conventions"]
    assert {m for c in conventions for m in c["models"]} >= {
        "timm.models.mobilenetv3.MobileNetV3", "torchvision.models.mobilenetv3.MobileNetV3"}
    assert data["inverted-residual"]["defaults"]["squeeze_from"] == "input"
    assert "Table 3" in data["mobilenet-v1"]["reference"]
