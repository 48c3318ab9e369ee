"""CoaT (timm coat): no convolutional block. Its convolutions are only patch embeddings, the depthwise convolutional
position encoding each stage shares among its blocks (ConvPosEnc, CPVT's PEG) and the depthwise convolutions on the
attention values (ConvRelPosEnc): SE-ResNet's residual branch, an inverted residual or a conv chain appear nowhere.
Its serial blocks are transformer blocks on token sequences: they take token SE after their MLP (the transformer
recipe, docs/transformers.md); the parallel blocks (several scales in, a tuple out) take none."""

from __future__ import annotations

import pytest
import timm
from timm.models.coat import ConvPosEnc, ConvRelPosEnc, SerialBlock
from torch import nn

import se_inject


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_coat_takes_token_se_in_its_serial_blocks_only(name):
    model = timm.create_model(name, device="meta")
    encodings = {p for p, m in model.named_modules() if isinstance(m, (ConvPosEnc, ConvRelPosEnc))}
    for path, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            patchify = tuple(conv.stride) == tuple(conv.kernel_size)
            assert patchify or any(path.startswith(f"{p}.") for p in encodings), path
    _, report = se_inject.inject(f"timm:{name}", device="meta", seed=0)
    serial = [p for p, m in model.named_modules() if isinstance(m, SerialBlock)]
    assert [s.path for s in report.plan.sites] == serial
    assert {(s.recipe, s.anchor, s.pattern) for s in report.plan.sites} == {("transformer", "mlp", "token-residual")}
