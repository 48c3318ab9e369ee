"""CoaT (timm coat): no convolutional block, so no SE. Its blocks (SerialBlock, ParallelBlock) are transformer blocks
on token sequences with a class token; its convolutions are only patch embeddings, the depthwise convolutional
position encoding each stage shares among its blocks (ConvPosEnc, CPVT's PEG) and the depthwise convolutions on the
attention values (ConvRelPosEnc): SE-ResNet's residual branch, an inverted residual or a conv chain appear nowhere."""

from __future__ import annotations

import pytest
import timm
from timm.models.coat import ConvPosEnc, ConvRelPosEnc
from torch import nn

import se_inject


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_coat_has_no_convolutional_block_and_takes_no_se(name):
    model = timm.create_model(name, device="meta")
    encodings = {p for p, m in model.named_modules() if isinstance(m, (ConvPosEnc, ConvRelPosEnc))}
    for path, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            patchify = tuple(conv.stride) == tuple(conv.kernel_size)
            assert patchify or any(path.startswith(f"{p}.") for p in encodings), path
    with pytest.raises(se_inject.NoSitesError, match="no matching blocks"):
        se_inject.inject(f"timm:{name}", device="meta", seed=0)
