"""Models whose designers put channel attention in some blocks only (partial SE): refused unless filled."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from typer.testing import CliRunner

import se_inject
from se_inject import NoSitesError
from se_inject.cli.commands import app
from se_inject.tools.scan import scan_one


def _mobilenet_v3_small_blocks() -> tuple[list[str], list[str]]:
    """Independent count: the InvertedResidual blocks with and without torchvision's SqueezeExcitation."""
    model = torchvision.models.mobilenet_v3_small()
    block = torchvision.models.mobilenetv3.InvertedResidual
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, block)]
    has = [p for p, m in blocks if any(isinstance(c, torchvision.ops.SqueezeExcitation) for c in m.modules())]
    return has, [p for p, _ in blocks if p not in has]


def test_partial_se_is_refused_by_default_naming_both_counts():
    has, lacks = _mobilenet_v3_small_blocks()
    assert has and lacks
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("torchvision:mobilenet_v3_small", device="meta", seed=0)
    assert info.value.reason == "partial-attention" and info.value.exit_code == 1
    message = str(info.value)
    assert f"{len(has)} matching blocks already have channel attention" in message
    assert f"{len(lacks)} lack it" in message
    assert "\n" not in message


def test_one_block_with_se_makes_the_model_partial():
    """A single block that has SE is enough: the model is partial, not free to be covered."""
    model = timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.layer2[0].se = timm.layers.SEModule(128)
    blocks = [p for p, m in model.named_modules() if isinstance(m, timm.models.resnet.BasicBlock)]
    with pytest.raises(NoSitesError, match="partial SE: 1 matching blocks") as info:
        se_inject.inject(model, seed=0, input_size=32)
    assert info.value.reason == "partial-attention" and info.value.existing == 1
    _, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, input_size=32)
    assert [s.path for s in report.plan.sites] == [p for p in blocks if p != "layer2.0"]
    assert [s.path for s in report.skipped if s.already_attention] == ["layer2.0"]


def test_fill_adds_se_only_where_it_is_missing():
    has, lacks = _mobilenet_v3_small_blocks()
    _, report = se_inject.inject("torchvision:mobilenet_v3_small", se_inject.Settings(fill=True), device="meta", seed=0)
    data = report.to_dict()
    assert data["already_attention"] == has
    # every block without SE gets one, except where the recipe finds no 1x1 projection (none in this model)
    assert [s["path"] for s in data["sites"]] == lacks


def test_fill_follows_lcnets_own_place_and_width():
    """LCNet's own SE sits after the depthwise conv (timm's `se` slot), squeezing the block's channels / 4 to a
    multiple of 8; the blocks LCNet leaves without SE get the same (not SE-MobileNet's place on the block output)."""
    from timm.layers import make_divisible
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    model = timm.create_model("lcnet_050")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv)]
    lacks = [(p, m.conv_dw.out_channels) for p, m in blocks if isinstance(m.se, torch.nn.Identity)]
    own = [m.se.conv_reduce for _, m in blocks if not isinstance(m.se, torch.nn.Identity)]
    assert lacks and own and all(c.out_channels == make_divisible(c.in_channels / 4, 8) for c in own)
    _, report = se_inject.inject("lcnet_050", se_inject.Settings(fill=True), device="meta", seed=0)
    assert [(s.path, s.slot, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "se", c, make_divisible(c / 4, 8)) for p, c in lacks]


def test_cli_fill(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["torchvision:mobilenet_v3_small", "--dry-run"], env={"COLUMNS": "200"})
    assert refused.exit_code == 1
    assert "partial SE" in refused.output and "--fill" in refused.output
    filled = runner.invoke(app, ["torchvision:mobilenet_v3_small", "--dry-run", "--fill"], env={"COLUMNS": "200"})
    assert filled.exit_code == 0, filled.output
    has, _ = _mobilenet_v3_small_blocks()
    assert f"{len(has)} blocks already had channel attention" in filled.output


def test_legacy_senet_is_already_se():
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("timm:legacy_seresnet18", device="meta", seed=0)
    assert info.value.reason == "already-attention"
    assert "SEModule" in str(info.value)


@pytest.mark.parametrize(("name", "status"), [
    ("torchvision:mobilenet_v3_small", "partial-se"),
    ("timm:legacy_seresnet18", "already-se"),
    ("torchvision:resnet18", "covered"),
])
def test_scan_categories(name, status):
    row = scan_one(name)
    assert row.status == status, row
    if status == "partial-se":
        assert row.existing and row.sites and row.params_delta
