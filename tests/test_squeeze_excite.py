"""The SE layer itself: the paper's equations, the seed document's SELayer, squeeze-width rounding, identity init."""

from __future__ import annotations

import inspect

import pytest
import torch
from family_checks import scales_in_place
from timm.layers import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite as EfficientNetSE
from torch import nn

from se_inject.layers.attention import create_attention, identity_gain, squeeze_channels
from se_inject.layers.squeeze_excite import SqueezeExcite
from se_inject.settings import SESettings


class SELayer(nn.Module):
    """Verbatim from the seed document (../shared/seeds/000_*.txt)."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


@pytest.mark.parametrize(("channels", "reduction"), [(32, 16), (24, 16), (100, 16), (64, 4), (40, 3)])
def test_divisor_1_no_bias_is_the_seed_selayer(channels, reduction):
    ref = SELayer(channels, reduction)
    se = SqueezeExcite(channels, rd_channels=squeeze_channels(channels, reduction, divisor=1), bias=False)
    assert se.fc1.out_channels == channels // reduction
    with torch.no_grad():
        se.fc1.weight.copy_(ref.fc[0].weight[:, :, None, None])
        se.fc2.weight.copy_(ref.fc[2].weight[:, :, None, None])
    x = torch.randn(2, channels, 7, 9)
    torch.testing.assert_close(se(x), ref(x), rtol=1e-6, atol=1e-6)
    assert sum(p.numel() for p in se.parameters()) == sum(p.numel() for p in ref.parameters())


def test_forward_follows_the_paper_equations():
    se = SqueezeExcite(16, rd_channels=4)
    x = torch.randn(3, 16, 5, 5)
    z = x.mean((2, 3))  # eq. 2: squeeze
    s = torch.sigmoid(se.fc2.weight[:, :, 0, 0] @ torch.relu(se.fc1.weight[:, :, 0, 0] @ z.T + se.fc1.bias[:, None])
                      + se.fc2.bias[:, None]).T  # eq. 3: excitation
    torch.testing.assert_close(se(x), x * s[:, :, None, None])  # eq. 4: scale


def test_same_keys_and_outputs_as_timm_semodule():
    ours, theirs = SqueezeExcite(64), SEModule(64)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 6, 6)
    assert torch.equal(ours(x), theirs(x))  # the same layers in the same order (the GEMM lives in fusion)


@pytest.mark.parametrize(("layout", "theirs"), [
    ("fc", lambda: SEModule(64, rd_ratio=0.25, norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU)),
    ("conv", lambda: EfficientNetSE(64, rd_ratio=0.25, act_layer=nn.SiLU)),  # timm EfficientNet's names
])
def test_layout_names_the_layers_as_timm_does(layout, theirs):
    norm = "batchnorm" if layout == "fc" else None
    ours, theirs = SqueezeExcite(64, rd_ratio=0.25, act_layer="silu", norm_layer=norm, layout=layout), theirs()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 6, 6)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_layers_are_a_class_or_a_name():
    by_name = SqueezeExcite(16, rd_channels=4, act_layer="leaky-relu", gate_layer="hard-sigmoid")
    by_class = SqueezeExcite(16, rd_channels=4, act_layer=nn.LeakyReLU, gate_layer=nn.Hardsigmoid)
    for se in (by_name, by_class):
        assert type(se.act) is nn.LeakyReLU and se.act.inplace and type(se.gate) is nn.Hardsigmoid
    with pytest.raises(ValueError, match="fc"):
        SqueezeExcite(16, norm_layer="batchnorm", layout="conv")


def test_scripted_result_runs_under_timms_torchscript_settings():
    """timm's test_model_forward_torchscript runs with the profiling executor on and profiling mode off; a block's
    SE slot filled with the plain layer once failed there ("Expected Tensor but got None")."""
    import se_inject

    model, _ = se_inject.inject("timm:test_efficientnet", se_inject.Settings(fill=True), seed=0, input_size=32)
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    try:
        scripted = torch.jit.script(model.eval())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            for _ in range(3):  # the executor optimises the graph after the first runs
                torch.testing.assert_close(scripted(x), model(x))
    finally:
        torch._C._jit_set_profiling_executor(executor)
        torch._C._jit_set_profiling_mode(mode)


@pytest.mark.parametrize(("channels", "reduction", "divisor", "expected"), [
    (256, 16, 8, 16),  # seresnet50 layer1
    (64, 16, 8, 8),  # seresnet18 layer1: 4 rounds up to the divisor
    (2048, 16, 8, 128),
    (64, 128, 8, 8),  # reduction larger than the channels clamps to the divisor
    (64, 128, 1, 1),
    (100, 16, 1, 6),  # C // r
    (72, 4, 8, 16),
])
def test_squeeze_channels(channels, reduction, divisor, expected):
    assert squeeze_channels(channels, reduction, divisor) == expected


def test_squeeze_channels_matches_timm_for_even_divisors():
    from timm.layers import make_divisible

    for c in range(8, 700, 7):
        for r in (2, 4, 8, 16, 32):
            assert squeeze_channels(c, r, 8) == make_divisible(c / r, 8, round_limit=0.0)


@pytest.mark.parametrize(("channels", "reduction", "divisor", "rounding", "expected"), [
    (38, 8, 1, "round", 5),  # 4.75
    (30, 4, 1, "round", 8),  # 7.5: Python's round, to even
    (42, 4, 1, "round", 10),  # 10.5: to even, down
    (38, 8, 1, "floor", 4),
    (30, 4, 1, "floor", 7),
    (7, 8, 1, "floor", 1),  # never below 1
    (38, 8, 1, "divisible", 4),  # C // r with divisor 1
    (60, 8, 8, "divisible", 8),  # 7.5 -> 7, then up to the divisor
    (188, 8, 8, "divisible", 24),  # 23.5 -> 23, then to the nearest multiple of 8
])
def test_squeeze_channels_for_each_rounding_with_fractions(channels, reduction, divisor, rounding, expected):
    assert squeeze_channels(channels, reduction, divisor, rounding=rounding) == expected


def test_squeeze_channels_round_and_floor_match_timm_and_torchvision():
    """"round" is timm EfficientNet's ``SqueezeExcite`` width, "floor" torchvision EfficientNet's; half of the
    widths below have a fraction of .5 or more."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    fractions = 0
    for c in range(8, 80, 3):
        for r in (3, 4, 6, 7):
            fractions += (c % r) * 2 >= r
            with torch.device("meta"):
                timm_width = SqueezeExcite(c, rd_ratio=1 / r).conv_reduce.out_channels
            assert squeeze_channels(c, r, rounding="round") == timm_width, (c, r)
            assert squeeze_channels(c, r, rounding="floor") == max(1, c // r), (c, r)
    assert fractions > 40


@pytest.mark.parametrize("gate", ["sigmoid", "hard-sigmoid"])
def test_identity_init_is_exact_and_learns(gate):
    spec = SESettings(attn_layer="se", channels=32, rd_channels=8, bias=True, gate_layer=gate, gain=identity_gain(gate))
    se = create_attention(spec)
    se.init_identity()
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    y = se(x)
    assert torch.equal(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert se.fc2.weight.grad.norm() > 0
    assert se.fc2.bias.grad.norm() > 0


def test_scriptable():
    se = SqueezeExcite(16, rd_channels=8, gain=2.0)
    scripted = torch.jit.script(se)
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(scripted(x), se(x))


@pytest.mark.parametrize("name", ["timm:resnet18", *(pytest.param(n, marks=pytest.mark.slow) for n in (
    "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:googlenet", "timm:inception_resnet_v2"))])
def test_in_place_scaling_without_autograd_gives_the_same_outputs(name):
    """With autograd off, SE scales its input in place where the graph shows nothing else reads it; the outputs
    (and the training path) must not change."""
    import se_inject

    model, report = se_inject.inject(name, seed=0)
    model.eval()
    assert any(scales_in_place(model, s) for s in report.plan.sites)
    x = torch.randn(2, 3, 96, 96)
    with torch.enable_grad():
        expected = model(x).detach()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    model = model.to(memory_format=torch.channels_last)  # the NHWC in-place path
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        expected = model(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


class SharedInput(torch.nn.Module):
    """`bn`'s output feeds both the SE place (before `proj`) and the addition: scaling it in place would change
    the sum."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.proj = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.proj(y) + y


def test_no_in_place_when_the_input_has_other_readers(tmp_path):
    import se_inject

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), SharedInput()).eval()
    path = tmp_path / "r.toml"
    path.write_text(f'name = "shared"\n[[blocks]]\nclasses = ["{__name__}.SharedInput"]\nbefore = "proj"\n')
    injected, _ = se_inject.inject(model, recipes=["shared", path], input_size=16, seed=0)
    assert "inplace" not in inspect.getsource(type(injected[1]).forward)
    x = torch.randn(1, 3, 16, 16)
    with torch.enable_grad():
        expected = injected(x).detach()
    with torch.no_grad():
        assert torch.equal(injected(x), expected)
