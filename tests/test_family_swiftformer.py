"""SwiftFormer (timm swiftformer.ConvEncoder): SE at the end of the residual branch, after the last 1x1 conv and
before the layer scale; the attention Blocks get none (see recipes/swiftformer.toml)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.swiftformer import Block, ConvEncoder

import se_inject


def test_every_conv_encoder_takes_se_at_the_end_of_its_branch():
    model, report = se_inject.inject("timm:swiftformer_xs", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, ConvEncoder)]
    assert report.plan.recipes == ("swiftformer",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks] and blocks
    assert [s.channels for s in report.plan.sites] == [m.pwconv2.out_channels for _, m in blocks]
    assert all((s.pattern, s.anchor, s.position) == ("residual", "pwconv2", "after") for s in report.plan.sites)
    assert any(isinstance(m, Block) for m in model.modules())  # attention blocks: present, no SE


def test_identity_init_reproduces_the_base_model_and_se_precedes_the_layer_scale():
    injected, report = assert_identity_reproduces(real_model("swiftformer_xs"), 64)
    block = injected.get_submodule(report.plan.sites[0].path)
    seen = {}
    hooks = [block.se.register_forward_hook(lambda _m, _args, out: seen.update(se=out)),
             block.layer_scale.register_forward_pre_hook(lambda _m, args: seen.update(scale=args[0]))]
    with torch.no_grad():
        block(torch.randn(1, block.dwconv.in_channels, 4, 4))
    for hook in hooks:
        hook.remove()
    assert seen["se"] is seen["scale"]


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("swiftformer_xs"), 64)
