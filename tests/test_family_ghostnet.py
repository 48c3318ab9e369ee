"""GhostNet v1/v2/v3 and RepGhost: SE in some Ghost bottlenecks by design (partial SE); --fill gives the others the
designers' own SE (after the depthwise conv, make_divisible(expanded / 4, 4), hard-sigmoid)."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models import ghostnet, repghost
from torch import nn

import se_inject
from se_inject import NoSitesError

BLOCKS = (ghostnet.GhostBottleneck, ghostnet.GhostBottleneckV3, repghost.RepGhostBottleneck)


def _blocks(model: nn.Module) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Independent count: (path, expanded channels) of the Ghost bottlenecks with and without SE; the expanded width is
    what the second ghost module's first convolution takes in."""
    has, lacks = [], []
    for path, block in model.named_modules():
        if isinstance(block, BLOCKS):
            width = next(c for c in block.ghost2.modules() if isinstance(c, nn.Conv2d)).in_channels
            (lacks if block.se is None or isinstance(block.se, nn.Identity) else has).append((path, width))
    return has, lacks


def _own_width(channels: int) -> int:
    """GhostNet's own rule, from timm's own SE layer for these models (se_ratio 0.25 in every config)."""
    return ghostnet._SE_LAYER(channels, rd_ratio=0.25, device="meta").conv_reduce.out_channels


@pytest.mark.parametrize("name", [
    "ghostnet_050", *(pytest.param(n, marks=pytest.mark.slow) for n in ("ghostnetv3_050", "repghostnet_050",
                                                                         "ghostnetv2_100"))])
def test_partial_se_refused_by_default_and_filled_with_ghostnets_own_se(name):
    model = timm.create_model(name, device="meta")
    has, lacks = _blocks(model)
    assert has and lacks
    own = [m.se for m in model.modules() if isinstance(m, BLOCKS) and m.se is not None
           and not isinstance(m.se, nn.Identity)]
    assert all(se.conv_reduce.out_channels == _own_width(se.conv_reduce.in_channels) for se in own)
    with pytest.raises(NoSitesError) as info:
        se_inject.inject(name, device="meta", seed=0)
    assert info.value.reason == "partial-attention"

    _, report = se_inject.inject(name, se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("ghostnet",)
    assert report.to_dict()["already_attention"] == [p for p, _ in has]
    assert [(s.path, s.slot, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "se", c, _own_width(c)) for p, c in lacks]
    assert {s.attention.gate_layer for s in report.plan.sites} == {"hard-sigmoid"}


@pytest.mark.parametrize("name", ["repghostnet_050", pytest.param("ghostnet_050", marks=pytest.mark.slow)])
def test_identity_init_reproduces_the_base_model(name):
    injected, report = assert_identity_reproduces(real_model(name), 64, fill=True)
    # the filled slots sit where the designers' own SE sits: the blocks' `se` attribute
    assert all(isinstance(injected.get_submodule(s.path).se, nn.Module) for s in report.plan.sites)
    assert not any(b.se is None or isinstance(b.se, nn.Identity) for b in injected.modules() if isinstance(b, BLOCKS))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ghostnet_050", "ghostnetv3_050", "repghostnet_050"])
def test_script_and_export(name):
    assert_scripts_and_exports(real_model(name), 64, fill=True)


@pytest.mark.slow
def test_filled_none_slots_save_and_load(tmp_path):
    """GhostNet v1's empty slot is None (not nn.Identity): the saved plan replays onto a fresh model exactly."""
    model = timm.create_model("ghostnet_050").eval()
    injected, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, input_size=64)
    se_inject.save(injected, report, tmp_path / "out")
    back = se_inject.load(tmp_path / "out", model=timm.create_model("ghostnet_050"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), injected.eval()(x))
