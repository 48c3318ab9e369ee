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


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_fill_follows_lcnets_own_place_and_width():
    """LCNet's own SE sits after the depthwise conv (timm's `se` slot) and is timm's `SqueezeExcite` as `_gen_lcnet`
    builds it: ReLU forced inside, hard-sigmoid, width round(C / 4) (`rd_round_fn` left at its default, `round`).
    The two SE modules of lcnet_050 (128 and 256 channels) fit a multiple of 8 as well; lcnet_035's (88 -> 22) do
    not, and the blocks LCNet leaves without SE get timm's module, 2 and 4 channels at C = 8 and 16 (not 8)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, SqueezeExcite

    from se_inject.layers.attention import create_attention

    model = timm.create_model("lcnet_050")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv)]
    lacks = [(p, m.conv_dw.out_channels) for p, m in blocks if isinstance(m.se, torch.nn.Identity)]
    assert lacks and len(lacks) < len(blocks)
    _, report = se_inject.inject("lcnet_050", se_inject.Settings(fill=True), device="meta", seed=0)
    assert [(s.path, s.slot, s.channels) for s in report.plan.sites] == [(p, "se", c) for p, c in lacks]
    for site in report.plan.sites:  # timm's LCNet SE layer (mobilenetv3._gen_lcnet's se_layer) at the block's width
        reference = SqueezeExcite(site.channels, gate_layer="hard_sigmoid", force_act_layer=torch.nn.ReLU)
        ours = create_attention(site.attention)
        assert _shapes(ours) == _shapes(reference), site.path
        assert type(ours.act1) is type(reference.act1) and type(ours.gate) is type(reference.gate)
    assert [s.squeeze_channels for s in report.plan.sites[:2]] == [2, 4]


def test_fill_gives_fbnetv3s_depthwise_separable_blocks_its_hard_swish_se():
    """FBNetV3's first blocks are depthwise-separable and have no SE; its SE (in its inverted residuals) has the
    blocks' own hard-swish inside. Filled, those blocks get that SE: hard-swish, not the MobileNetV3 class's ReLU."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, SqueezeExcite

    model = timm.create_model("fbnetv3_b")
    own = [m.se for m in model.modules() if isinstance(getattr(m, "se", None), SqueezeExcite)]
    assert own and {type(se.act1) for se in own} == {torch.nn.Hardswish}  # timm's FBNetV3 SE
    separable = [p for p, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv)]
    assert separable == ["blocks.0.0", "blocks.0.1"]
    filled, report = se_inject.inject("timm:fbnetv3_b", se_inject.Settings(fill=True), device="meta", seed=0)
    for site in report.plan.sites:
        block = model.get_submodule(site.path)
        assert site.attention.act_layer == "hard-swish"
        assert type(filled.get_submodule(site.module_path).act1) is type(block.bn1.act) is torch.nn.Hardswish
    assert [s.path for s in report.plan.sites[:2]] == separable


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
