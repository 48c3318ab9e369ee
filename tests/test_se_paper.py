"""The SE paper's SE-ResNet-50 numbers, computed from timm's own models: why se-inject's differ where they do."""

from __future__ import annotations

import functools

import pytest
import timm
from timm.layers import SEModule

import se_inject
from se_inject.engine.build import build_model
from se_inject.engine.measure import count
from se_inject.engine.resolve import resolve_model

# Hu et al., Squeeze-and-Excitation Networks, Table 10: SE-ResNet-50's parameters (millions) at reduction ratio r.
PAPER_TABLE_10 = {2: 45.7, 4: 35.7, 8: 30.7, 16: 28.1, 32: 26.9}


def _timm_seresnet50(r: int):
    """timm's seresnet50 with its SE built at reduction r (SEModule's rd_ratio 1 / r), on the meta device."""
    return timm.create_model("seresnet50", device="meta",
                             block_args={"attn_layer": functools.partial(SEModule, rd_ratio=1 / r)})


@pytest.mark.parametrize("r", sorted(PAPER_TABLE_10))
def test_se_resnet50_params_at_each_reduction_are_timms(r):
    reference = _timm_seresnet50(r)
    params = sum(p.numel() for p in reference.parameters())
    _, report = se_inject.inject("timm:resnet50", se_inject.Settings(rd_ratio=1 / r), device="meta", seed=0)
    assert report.after.params == params
    biases = sum(p.numel() for n, p in reference.named_parameters() if ".se." in n and n.endswith(".bias"))
    rounded = {round(params / 1e6, 1), round((params - biases) / 1e6, 1)}  # with and without the SE's biases
    if r in (4, 8, 32):  # Table 10's values there: no SE-ResNet-50 count rounds to them
        assert PAPER_TABLE_10[r] not in rounded and round(params / 1e6, 2) == {4: 35.64, 8: 30.60, 32: 26.83}[r]
    else:
        assert PAPER_TABLE_10[r] in rounded


def test_se_resnet50_macs_are_resnet_v1_5s_and_the_paper_counts_resnet_v1():
    """timm (and torchvision) build ResNet v1.5: a stage's first block strides in its 3x3 conv. The paper's ResNet-50
    is v1 (stride in the first 1x1 conv): moving the stride there gives the paper's 3.86 GMACs, and SE-ResNet-50's
    3.87 counts the SE's elementwise work at half (one MAC per multiply-add pair, as for SE-VGG-16)."""
    v15 = build_model(resolve_model("timm:resnet50"), device="meta")
    first = v15.layer2[0]
    assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2))  # v1.5
    _, report = se_inject.inject("timm:resnet50", device="meta", seed=0)
    assert (round(report.before.macs / 1e9, 3), round(report.after.macs / 1e9, 3)) == (4.089, 4.092)
    v1 = build_model(resolve_model("timm:resnet50"), device="meta")
    for layer in (v1.layer2, v1.layer3, v1.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
    assert round(count(v1, (3, 224, 224)).macs / 1e9, 2) == 3.86  # the paper's ResNet-50 (Table 2)
    _, se = se_inject.inject(v1, device="meta", seed=0, input_size=224)
    elementwise = se.to_dict()["se_elementwise_ops"]
    assert round((se.after.macs + elementwise / 2) / 1e9, 2) == 3.87  # the paper's SE-ResNet-50
