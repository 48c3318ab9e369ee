"""MambaOut (timm mambaout.GatedConvBlock): SE on the depthwise conv's output, the block's one NCHW map (see
recipes/mambaout.toml)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.mambaout import GatedConvBlock

import se_inject


def test_every_gated_conv_block_takes_se_on_its_depthwise_conv():
    model, report = se_inject.inject("timm:test_mambaout", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, GatedConvBlock)]
    assert report.plan.recipes == ("mambaout",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks] and blocks
    assert [s.channels for s in report.plan.sites] == [m.conv.out_channels for _, m in blocks]
    assert all((s.anchor, s.position) == ("conv", "after") for s in report.plan.sites)
    squeeze = [max(8, int(c / 16 + 4) // 8 * 8) for c in (s.channels for s in report.plan.sites)]
    assert [s.squeeze_channels for s in report.plan.sites] == squeeze  # C / 16 to a multiple of 8 (timm SEModule)


def test_conv_ratio_sets_the_se_width():
    """mambaout_*_rw convolve 1.25-1.5x the block width: the SE scales what the conv outputs."""
    model = real_model("test_mambaout", conv_ratio=1.5)
    _, report = se_inject.inject(model, seed=0, input_size=32)
    blocks = [m for m in model.modules() if isinstance(m, GatedConvBlock)]
    assert [s.channels for s in report.plan.sites] == [m.conv.out_channels for m in blocks]
    assert all(m.conv.out_channels == 3 * m.fc2.out_features // 2 for m in blocks)


def test_identity_init_reproduces_the_base_model_and_se_scales_the_conv_output():
    model = real_model("test_mambaout")
    injected, report = assert_identity_reproduces(model, 32)
    site = report.plan.sites[0]
    block, base = injected.get_submodule(site.path), model.get_submodule(site.path)
    seen = {}
    hook = block.se.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
    with torch.no_grad():
        h = torch.randn(1, 8, 8, base.fc1.in_features)  # channels-last, as the block runs
        block(h)
        _, _, c = torch.split(base.fc1(base.norm(h)), base.split_indices, dim=-1)
        expected = base.conv(c.permute(0, 3, 1, 2))
    hook.remove()
    assert torch.equal(seen["x"], expected)


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("test_mambaout"), 32)
