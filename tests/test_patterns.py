"""Structural patterns: blocks matched by the shape of their graph, whatever their class, and the families and SE
paper networks (SE-VGG-16, ShuffleNet) that recipes take through them."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject
from se_inject import RecipeFileError, load_recipe_file
from se_inject.engine.build import build_model
from se_inject.engine.patterns import conv_chain, match_block
from se_inject.engine.resolve import resolve_model
from se_inject.engine.surgery import apply_plan
from se_inject.engine.traces import trace_block


class ToyBlock(nn.Module):
    """docs/recipes.md's block: a residual unit with no recipe naming its class."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class ScaledBlock(nn.Module):
    """ConvNeXt-like: depthwise conv, channels-last MLP, permute back, layer scale, drop-path, addition."""

    def __init__(self, channels):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.fc2 = nn.Linear(2 * channels, channels)
        self.mlp = nn.Sequential(self.fc1, nn.GELU(), self.fc2)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(y) + x


class Branches(nn.Module):
    """Inception-like: parallel branches concatenated."""

    def __init__(self, channels):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class MBConv(nn.Module):
    """Inverted residual: expand, depthwise, project, residual addition."""

    def __init__(self, channels):
        super().__init__()
        self.expand = nn.Conv2d(channels, 4 * channels, 1)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(4 * channels, 4 * channels, 3, padding=1, groups=4 * channels)
        self.bn = nn.BatchNorm2d(4 * channels)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x):
        return x + self.project(self.act2(self.bn(self.dw(self.act1(self.expand(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.res = ToyBlock(16)
        self.scaled = ScaledBlock(16)
        self.mb = MBConv(16)
        self.cat = Branches(16)
        self.chain = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        return self.chain(self.cat(self.mb(self.scaled(self.res(self.stem(x))))))


def test_each_pattern_finds_its_place():
    net = Net()
    assert match_block(net.res, "residual").anchor == "bn"
    scaled = match_block(net.scaled, "residual")
    assert scaled.anchor.startswith("%permute") and scaled.position == "after"  # back in NCHW, before gamma
    assert match_block(net.mb, "inverted-residual").anchor == "project"
    assert match_block(net.mb, "inverted-residual").position == "before"
    assert match_block(net.cat, "concat").anchor == ""
    assert conv_chain(net.chain) == ["2", "4"]
    assert match_block(net.cat, "residual") is None  # no addition
    assert match_block(net.res, "concat") is None
    assert match_block(net.res, "inverted-residual") is None
    assert conv_chain(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())) == []  # one unit is not a stack
    units = [nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.ReLU()]
    assert conv_chain(nn.Sequential(*units, nn.Sequential(*units))) == ["1", "3"]  # a nested stack is its own
    assert conv_chain(nn.Sequential(*units, ToyBlock(3))) == []  # a block inside: not a plain stack
    assert conv_chain(nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv1d(3, 3, 1),
                                    nn.ReLU())) == ["2", "4"]  # any rank: SE squeezes every non-channel dimension


def test_pattern_rules_narrow_by_path_below_their_within_class(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[[patterns]]\npattern = "residual"\n'
                    f'within = ["{__name__}.Net"]\npaths = ["sca*"]\n')
    _, report = se_inject.inject(nn.Sequential(Net()), seed=0, input_size=16, recipes=["mine", path])
    assert [s.path for s in report.plan.sites] == ["0.scaled"]  # "0.scaled" is "scaled" below the Net


def test_matching_changes_nothing_and_traces_once_per_configuration():
    blocks = [ToyBlock(8), ToyBlock(8), ToyBlock(16)]
    before = [state_snapshot(b) for b in blocks]
    graphs = [trace_block(b) for b in blocks]
    assert graphs[0] is graphs[1]  # same class and configuration: one trace
    assert graphs[2] is not graphs[0]
    for b, snap in zip(blocks, before, strict=True):
        assert type(b) is ToyBlock and state_snapshot(b).keys() == snap.keys()


def test_user_model_gets_se_by_structure_without_a_recipe_file():
    net = randomize_norm_stats(Net()).eval()
    before = state_snapshot(net)
    injected, report = se_inject.inject(net, se_inject.Settings(init="identity"), seed=0, input_size=16)
    sites = {s.path: (s.pattern, s.anchor, s.channels) for s in report.plan.sites}
    assert sites == {
        "res": ("residual", "bn", 16),
        "scaled": ("residual", sites["scaled"][1], 16),
        "mb": ("inverted-residual", "project", 64),
        "cat": ("concat", "", 24),
        "chain.2": ("conv-chain", "", 24),
        "chain.4": ("conv-chain", "", 32),
    }
    assert {s.recipe for s in report.plan.sites} == {"structural"}
    assert all(row["pattern"] for row in report.to_dict()["sites"])  # the report says the match was structural
    after = injected.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # every key kept, nothing renumbered
    assert [n for n, _ in injected.chain.named_children()] == [n for n, _ in net.chain.named_children()]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(injected(x), net(x))  # identity init: exactly the base model
    # the SE sits where the pattern says: on the block's MLP output, before gamma
    seen = {}
    hook = injected.scaled.se.register_forward_hook(lambda _m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        h = torch.randn(1, 16, 8, 8)
        injected.scaled(h)
        mlp = net.scaled.mlp(net.scaled.norm(net.scaled.conv_dw(h).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    hook.remove()
    assert torch.equal(seen["x"], mlp)
    reloaded = apply_plan(net, report.plan)  # the plan replays (node anchors included) on a fresh copy
    with torch.no_grad():
        assert torch.equal(reloaded(x), net(x))


def test_class_rules_take_precedence_over_patterns():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), torchvision.models.resnet.BasicBlock(64, 64), ToyBlock(64))
    _, report = se_inject.inject(model, seed=0, input_size=16)
    assert [(s.path, s.recipe, s.pattern) for s in report.plan.sites] == [
        ("1", "resnet-residual", ""), ("2", "structural", "residual")]


@pytest.mark.parametrize(("text", "field"), [
    ('pattern = "spiral"', "patterns[0].pattern"),
    ('pattern = "residual"\nclasses = "x"', "patterns[0].classes"),
    ('pattern = "residual"\nwithin = ["a b"]', "patterns[0].within"),
    ('pattern = "residual"\nafter = "bn"', "after"),
    ('classes = ["*"]', "missing field"),
    ('pattern = "conv-chain"\npaths = "extra.0"', "patterns[0].paths"),
    ('pattern = "conv-chain"\npaths = ["extra 0"]', "patterns[0].paths"),
])
def test_malformed_pattern_rules_name_the_field(tmp_path, text, field):
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n[[patterns]]\n{text}\n')
    with pytest.raises(RecipeFileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_recipe_file(path)


def test_pattern_rules_narrow_by_class_and_model(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[[patterns]]\npattern = "residual"\nclasses = ["*.ToyBlock"]\n'
                    f'within = ["{__name__}.Net"]\n')
    _, report = se_inject.inject(Net(), seed=0, input_size=16, recipes=["mine", path])
    assert [s.path for s in report.plan.sites] == ["res"]
    with pytest.raises(se_inject.NoSitesError):
        se_inject.inject(nn.Sequential(ToyBlock(8)), seed=0, input_size=16, recipes=["mine", path])


# --- the SE paper's networks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm:vgg16_bn", "torchvision:vgg16_bn"])
def test_se_vgg16_takes_se_after_each_of_its_13_convolutions(name):
    model, report = se_inject.inject(name, device="meta", seed=0)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [s.channels for s in report.plan.sites] == [c.out_channels for c in convs]
    for site in report.plan.sites:  # each SE follows a conv-BN-ReLU unit of `features`
        i = int(site.path.split(".")[-1])
        assert isinstance(model.features[i - 2], nn.Conv2d) and isinstance(model.features[i - 1], nn.BatchNorm2d)
    assert round(report.before.macs / 1e9, 2) == 15.47  # the SE paper's VGG-16 baseline (Table 2)
    fc = sum(2 * s.channels * s.squeeze_channels for s in report.plan.sites)  # two FC layers per SE
    assert report.after.macs - report.before.macs == fc


def test_shufflenet_v2_takes_se_on_branch2_of_all_16_units():
    model, report = se_inject.inject("torchvision:shufflenet_v2_x1_0", device="meta", seed=0)
    units = [p for p, m in model.named_modules() if type(m).__name__ == "InvertedResidual"]
    assert [s.path for s in report.plan.sites] == units and len(units) == 16
    for site in report.plan.sites:
        branch2 = model.get_submodule(f"{site.path}.branch2")
        assert site.anchor == "branch2" and site.channels == branch2[-2].num_features  # its last BN


# --- families (smallest model each, meta device) ---------------------------------------------------------------------


def _last_conv(module: nn.Module) -> int:
    """Width at the end of a residual branch: the block's last convolution's output."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _depthwise(module: nn.Module) -> int:
    """Width after an inverted residual's depthwise convolution."""
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1).out_channels


def _byob(module: nn.Module) -> int:
    """ByobNet: inverted bottlenecks (a depthwise kxk conv) after it, the others at the end of the branch."""
    dw = any(isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels for m in module.modules())
    return _depthwise(module) if dw else _last_conv(module)


def _fire(module: nn.Module) -> int:
    return module.expand1x1.out_channels + module.expand3x3.out_channels


@pytest.mark.parametrize(("name", "recipe", "blocks", "width"), [
    ("timm:test_convnext", "convnext", {"ConvNeXtBlock"}, _last_conv),
    ("torchvision:convnext_tiny", "convnext", {"CNBlock"}, _last_conv),
    ("timm:gernet_s", "byobnet", {"BasicBlock", "BottleneckBlock"}, _byob),
    ("timm:repvgg_a0", "byobnet", {"RepVggBlock"}, _last_conv),
    pytest.param("timm:mobileone_s0", "byobnet", {"MobileOneBlock"}, _last_conv, marks=pytest.mark.slow),
    ("timm:mobilevit_xxs", "byobnet", {"BottleneckBlock"}, _byob),
    ("timm:cspresnet50", "cspnet", {"BottleneckBlock"}, _last_conv),
    ("timm:cs3darknet_s", "cspnet", {"DarkBlock"}, _last_conv),
    ("timm:cs3edgenet_x", "cspnet", {"EdgeBlock"}, _last_conv),
    ("timm:poolformer_s12", "metaformer", {"MetaFormerBlock"}, _last_conv),
    ("timm:fastvit_t8", "metaformer", {"RepMixerBlock"}, _last_conv),
    ("timm:starnet_s050", "residual-cnn", {"Block"}, _last_conv),
    ("timm:fasternet_t0", "residual-cnn", {"MLPBlock"}, _last_conv),
    ("timm:inception_next_atto", "residual-cnn", {"MetaNeXtBlock"}, _last_conv),
    ("timm:tiny_vit_5m_224", "hybrid-mbconv", {"MBConv"}, _depthwise),
    ("torchvision:squeezenet1_1", "concat", {"Fire"}, _fire),
    ("timm:dla46_c", "dla", {"DlaBottleneck"}, _last_conv),
])
def test_family_sites_equal_an_independent_count(name, recipe, blocks, width):
    """One SE per block of the family, on the width the SE paper's place has (counted from the block's own layers;
    families with their own design, ByobNet and CSPNet, put it elsewhere by default: tests/test_twins.py)."""
    model, report = se_inject.inject(name, se_inject.Settings(placement="paper"), device="meta", seed=0)
    expected = [(p, m) for p, m in model.named_modules() if type(m).__name__ in blocks]
    # MobileViT's transformer blocks take token SE (recipes/transformer.toml, tests/test_tokens.py)
    assert report.plan.recipes == ((recipe, "transformer") if name == "timm:mobilevit_xxs" else (recipe,))
    sites = [s for s in report.plan.sites if s.recipe == recipe]
    assert [s.path for s in sites] == [p for p, _ in expected]
    assert [s.channels for s in sites] == [width(m) for _, m in expected]
    assert all(s.pattern or s.slot or s.anchor for s in sites)


REAL = [
    ("timm", "test_convnext", 32),
    ("torchvision", "shufflenet_v2_x0_5", 32),
    ("timm", "dla46_c", 32),  # blocks called with and without their optional `shortcut` argument
    pytest.param("timm", "gernet_s", 32, marks=pytest.mark.slow),
    pytest.param("timm", "cs3darknet_s", 32, marks=pytest.mark.slow),
    pytest.param("timm", "repvgg_a0", 32, marks=pytest.mark.slow),
    pytest.param("torchvision", "alexnet", 64, marks=pytest.mark.slow),
    pytest.param("torchvision", "vgg11_bn", 32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("source", "name", "size"), REAL)
def test_identity_init_reproduces_real_models(source, name, size):
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    model = randomize_norm_stats(model).eval()
    before = state_snapshot(model)
    injected, _ = se_inject.inject(model, se_inject.Settings(init="identity"), seed=0, input_size=size)
    after = injected.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name", "size"), [p if isinstance(p, tuple) else p.values for p in REAL])
def test_structural_rewrites_script_and_export(source, name, size):
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    injected, _ = se_inject.inject(model.eval(), seed=0, input_size=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)


def test_architecture_category_of_models_without_sites():
    from se_inject.engine.category import architecture_category

    cnn = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(5)])
    assert architecture_category(cnn) == "CNN"
    patchify = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Linear(16, 16))
    assert architecture_category(patchify) == "MLP"
    assert architecture_category(nn.Sequential(patchify, nn.MultiheadAttention(16, 2))) == "transformer"
    assert architecture_category(nn.Sequential(cnn, nn.MultiheadAttention(16, 2))) == "hybrid"

    class ConvPosEnc(nn.Module):  # DaViT's: a depthwise conv added to the tokens, not a convolutional block
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    class PoolingAttention(nn.Module):  # MViTv2's: convolutions pool queries and keys
        def __init__(self):
            super().__init__()
            self.pool_q = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)

    encodings = nn.Sequential(patchify, *[nn.Sequential(ConvPosEnc(), PoolingAttention()) for _ in range(6)])
    assert architecture_category(encodings) == "transformer"
    assert architecture_category(nn.Sequential(encodings, cnn)) == "hybrid"
    for name in ["timm:davit_tiny", "timm:mvitv2_tiny", "timm:convit_tiny", "timm:coat_lite_tiny"]:
        assert architecture_category(build_model(resolve_model(name), device="meta")) == "transformer", name


def test_structural_sites_save_and_load(tmp_path):
    """The checkpoint's plan keeps each site's pattern and graph-node anchor; load replays them exactly."""
    net = randomize_norm_stats(Net()).eval()
    injected, report = se_inject.inject(net, seed=0, input_size=16)
    se_inject.save(injected, report, tmp_path / "out")
    back = se_inject.load(tmp_path / "out", model=Net())
    assert [s.pattern for s in se_inject.read_plan(tmp_path / "out").sites] == [s.pattern for s in report.plan.sites]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), injected(x))
