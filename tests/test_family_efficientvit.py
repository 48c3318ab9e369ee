"""EfficientViT (MIT): SE in its MBConv and FusedMBConv blocks (hybrid-mbconv recipe)."""

from __future__ import annotations

import timm
import torch

import se_inject


def test_fused_and_depthwise_mbconv_take_se_before_the_projection():
    """Independent count: one SE per MBConv / FusedMBConv, on the expanded map, squeezing the block's input channels
    / 4 (EfficientNet's convention); identity init reproduces the base model."""
    model = timm.create_model("efficientvit_l1").eval()
    blocks = [(p, m) for p, m in model.named_modules() if type(m).__name__ in ("MBConv", "FusedMBConv")]
    expected = []
    for path, block in blocks:
        first = block.spatial_conv.conv if hasattr(block, "spatial_conv") else block.inverted_conv.conv
        expanded = block.point_conv.conv.in_channels
        expected.append((path, expanded, round(first.in_channels / 4)))
    assert any(type(m).__name__ == "FusedMBConv" for _, m in blocks)
    injected, report = se_inject.inject(model, se_inject.Settings(init="identity"), seed=0, input_size=32)
    assert [(s.path, s.channels, s.squeeze_channels) for s in report.plan.sites] == expected
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))
