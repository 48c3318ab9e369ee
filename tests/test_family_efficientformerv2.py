"""EfficientFormerV2 (timm efficientformer_v2): SE after the depthwise conv of the attention-free blocks' MBConv
(mlp.mid), before the 1x1 projection; blocks with attention get none (see recipes/efficientformerv2.toml)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.efficientformer_v2 import EfficientFormerV2Block
from torch import nn

import se_inject
from se_inject.engine.recipes import BlockRule


def test_attention_free_blocks_take_se_after_the_depthwise_conv():
    model, report = se_inject.inject("timm:efficientformerv2_s0", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, EfficientFormerV2Block)]
    conv_blocks = [(p, m) for p, m in blocks if m.token_mixer is None]
    assert conv_blocks and len(conv_blocks) < len(blocks)
    assert report.plan.recipes == ("efficientformerv2",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in conv_blocks]
    assert [s.channels for s in report.plan.sites] == [m.mlp.mid.conv.out_channels for _, m in conv_blocks]
    assert all(m.mlp.mid.conv.groups == m.mlp.mid.conv.out_channels for _, m in conv_blocks)  # depthwise
    assert all((s.anchor, s.position) == ("mlp.fc2", "before") for s in report.plan.sites)
    # EfficientNet's width: the block's input channels / 4, rounded
    assert [s.squeeze_channels for s in report.plan.sites] == [round(m.mlp.fc1.conv.in_channels / 4)
                                                                for _, m in conv_blocks]


def test_when_names_a_child_module_or_none_by_class():
    rule = BlockRule(("x.Block",), "fc2", "before", when=(("token_mixer", "None"),))
    assert rule.applies_to(nn.Module()) is False  # no such attribute
    with_none, with_attention = nn.Module(), nn.Module()
    with_none.token_mixer = None
    with_attention.token_mixer = nn.MultiheadAttention(8, 2)
    assert rule.applies_to(with_none) and not rule.applies_to(with_attention)
    identity = BlockRule(("x.Block",), "fc2", "before", when=(("mixer", "Identity"), ("depth", 2)))
    block = nn.Module()
    block.mixer, block.depth = nn.Identity(), 2
    assert identity.applies_to(block)
    block.depth = "2"  # a plain attribute must equal the value: no class-name matching for it
    assert not identity.applies_to(block)


@pytest.mark.slow
def test_identity_init_reproduces_the_base_model_and_se_takes_the_depthwise_output():
    model = real_model("efficientformerv2_s0", img_size=64)  # the attention biases are sized for this input
    injected, report = assert_identity_reproduces(model, 64)
    block = injected.get_submodule(report.plan.sites[0].path)
    seen = {}
    hooks = [block.se.register_forward_hook(lambda _m, args, _out: seen.update(se=args[0])),
             block.mlp.mid.register_forward_hook(lambda _m, _args, out: seen.update(mid=out))]
    with torch.no_grad():
        block(torch.randn(1, block.mlp.fc1.conv.in_channels, 4, 4))
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["se"], seen["mid"])  # the depthwise conv-BN-act's output, before fc2


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("efficientformerv2_s0", img_size=64), 64)
