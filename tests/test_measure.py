"""Counts are exact: checked against analytic SE formulas, torchvision's documented GFLOPS and numel sums."""

from __future__ import annotations

import pytest
import torch
import torchvision

import se_inject
from se_inject.engine.measure import count


def _se_params(channels: int, rd: int, bias: bool = True) -> int:
    return 2 * channels * rd + (rd + channels if bias else 0)


@pytest.mark.parametrize(("name", "size"), [("resnet50", 224), ("resnet18", 224), ("inception_v3", 299),
                                            ("mobilenet_v2", 224), ("googlenet", 224)])
def test_macs_match_torchvision_documented_gflops(name, size):
    with torch.device("meta"):
        model = torchvision.models.get_model(name)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    assert round(count(model, (3, size, size)).macs / 1e9, 3) == pytest.approx(weights.meta["_ops"], abs=1e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_param_delta_is_the_analytic_se_count(bias):
    injected, report = se_inject.inject("timm:resnet50", se_inject.Settings(bias=bias), device="meta", seed=0)
    analytic = sum(_se_params(s.channels, s.squeeze_channels, bias) for s in report.plan.sites)
    assert report.after.params - report.before.params == analytic
    assert sum(report.site_params.values()) == analytic
    numel = sum(p.numel() for n, p in injected.named_parameters() if ".se." in n)
    assert numel == analytic
    assert report.to_dict()["params"]["delta"] == analytic


def test_se_resnet50_numbers_match_the_paper():
    _, report = se_inject.inject("timm:resnet50", device="meta", seed=0)
    data = report.to_dict()
    # Hu et al. Sec. 4 / Table 2: ~2.5M extra parameters (~10%) and a negligible MAC increase for SE-ResNet-50.
    assert data["params"]["delta"] == 2_530_992
    assert data["macs"]["delta"] == sum(2 * s.channels * s.squeeze_channels for s in report.plan.sites)
    assert data["macs"]["before"] == 4_089_184_256


def test_elementwise_ops_per_site_are_pool_gate_and_scale():
    _, report = se_inject.inject("timm:resnet50", device="meta", seed=0)
    rows = report.site_rows()
    for row in rows:
        c, h, w = row["feature_map"]
        rd = row["squeeze_channels"]
        # pool reads C*H*W, ReLU on rd, sigmoid on C, scale writes C*H*W
        assert row["elementwise_ops"] == 2 * c * h * w + rd + c
        assert row["macs"] == 2 * c * rd
    total = report.to_dict()["se_elementwise_ops"]
    assert total == sum(r["elementwise_ops"] for r in rows)
    assert 10.5e6 < total < 11.5e6  # "about 11M ops against 2.5M MACs of FC" for SE-ResNet-50


def test_identity_gain_adds_one_multiply_per_channel():
    _, paper = se_inject.inject("timm:test_resnet", device="meta", seed=0)
    _, identity = se_inject.inject("timm:test_resnet", se_inject.Settings(init="identity"), device="meta", seed=0)
    extra = identity.to_dict()["se_elementwise_ops"] - paper.to_dict()["se_elementwise_ops"]
    assert extra == sum(s.channels for s in paper.plan.sites)


def test_input_size_changes_macs_not_params():
    _, small = se_inject.inject("timm:test_resnet", device="meta", seed=0, input_size=64)
    _, large = se_inject.inject("timm:test_resnet", device="meta", seed=0, input_size="128x128")
    assert small.after.params == large.after.params
    assert large.after.macs > small.after.macs
    assert small.plan.input_size == (3, 64, 64)
