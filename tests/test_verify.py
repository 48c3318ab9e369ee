"""Verified surgery: every rewritten block, with its new module passing its input through, computes exactly what the
original block computes on the arguments its parent really passes; a rewrite that does not is refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import randomize_norm_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import se_inject
import se_inject.engine.surgery
import se_inject.engine.verify
from se_inject import NoSitesError
from se_inject.layers.attention import class_path


class DlaBlock(nn.Module):
    """timm DLA's blocks: ``forward(x, shortcut=None)``, the parent passes a shortcut to some of them."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return torch.relu(out)


class FlagBlock(nn.Module):
    """Branches on a flag argument its parent passes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, residual: bool = False):
        out = self.bn(self.conv(x))
        if residual:
            out = out + x
        return torch.relu(out)


class TupleBlock(nn.Module):
    """Returns its output and an auxiliary tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.bn(self.conv(x))
        return torch.relu(out + x), out.mean((2, 3))


class Net(nn.Module):
    def __init__(self, blocks: list[tuple[str, dict]], channels: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        kinds = {"dla": DlaBlock, "flag": FlagBlock, "tuple": TupleBlock}
        self.blocks = nn.ModuleList(kinds[kind](channels) for kind, _ in blocks)
        self.calls = [call for _, call in blocks]
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        x = self.stem(x)
        aux = 0
        for block, call in zip(self.blocks, self.calls, strict=True):
            kwargs = {k: self.project(x) if v == "tensor" else v for k, v in call.items()}
            x = block(x, **kwargs)
            if isinstance(x, tuple):
                x, extra = x
                aux = aux + extra
        return self.head(x.mean((2, 3))) + (aux.sum() if isinstance(aux, torch.Tensor) else 0)


def _recipe(tmp_path: Path, rules: dict[type, str], name: str = "toy") -> Path:
    path = tmp_path / f"{name}.toml"
    lines = [f'name = "{name}"', "[defaults]", "reduction = 4"]
    for cls, place in rules.items():
        lines += ["[[blocks]]", f'classes = ["{class_path(cls)}"]', f'after = "{place}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _inject(model: nn.Module, recipe: Path, **options):
    return se_inject.inject(model, se_inject.Settings(init="identity", **options), recipes=["toy", recipe],
                            input_size=16, seed=0)


def _assert_identity(model: nn.Module, injected: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(injected.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_dla_style_blocks_keep_their_shortcut(tmp_path):
    model = randomize_norm_stats(Net([("dla", {"shortcut": "tensor"}), ("dla", {}), ("dla", {"shortcut": None})]))
    injected, report = _inject(model, _recipe(tmp_path, {DlaBlock: "bn2"}))
    assert [s.path for s in report.plan.sites] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [s.fixed_args for s in report.plan.sites] == [{}, {"shortcut": None}, {"shortcut": None}]
    _assert_identity(model, injected)
    se_inject.save(injected, report.plan, tmp_path / "out")  # the fixed arguments travel in the plan
    reloaded = se_inject.load(tmp_path / "out", model=model)
    _assert_identity(model, reloaded)


def test_a_rewrite_that_drops_the_shortcut_is_refused(tmp_path, monkeypatch):
    trace = se_inject.engine.surgery._trace_modes
    # The old tracing, which ignored the arguments the parent passes: the shortcut branch is frozen the wrong way.
    monkeypatch.setattr(se_inject.engine.surgery, "_trace_modes", lambda block, paths, fixed=None: trace(block, paths))
    monkeypatch.setattr(se_inject.engine.surgery, "_slot_rewrites", {})
    monkeypatch.setattr(se_inject.engine.surgery, "_rewrites", {})
    model = randomize_norm_stats(Net([("dla", {"shortcut": "tensor"}), ("dla", {})]))
    injected, report = _inject(model, _recipe(tmp_path, {DlaBlock: "bn2"}))
    assert [s.path for s in report.plan.sites] == ["blocks.0"]
    (refused,) = [s for s in report.skipped if s.path == "blocks.1"]
    assert "differs from the original" in refused.reason
    _assert_identity(model, injected)
    with pytest.raises(NoSitesError, match="failed its verification") as info:
        _inject(Net([("dla", {})]), _recipe(tmp_path, {DlaBlock: "bn2"}))
    assert info.value.reason == "unverified" and info.value.exit_code == 1


def test_block_branching_on_a_flag_argument(tmp_path):
    model = randomize_norm_stats(Net([("flag", {"residual": True}), ("flag", {}), ("flag", {"residual": True})]))
    injected, report = _inject(model, _recipe(tmp_path, {FlagBlock: "bn"}))
    assert [s.fixed_args for s in report.plan.sites] == [{"residual": True}, {"residual": False}, {"residual": True}]
    _assert_identity(model, injected)
    with pytest.raises(AssertionError, match="specialized"):  # called otherwise than traced: loud, not wrong
        injected.blocks[1](torch.randn(1, 16, 4, 4), residual=True)


def test_block_returning_a_tuple(tmp_path):
    model = randomize_norm_stats(Net([("tuple", {}), ("tuple", {})]))
    injected, report = _inject(model, _recipe(tmp_path, {TupleBlock: "bn"}))
    assert len(report.plan.sites) == 2
    _assert_identity(model, injected)
    with pytest.raises(NoSitesError, match="not one tensor"):  # SE on the block's output: which one?
        _inject(model, _recipe(tmp_path, {TupleBlock: "."}))


class TokenBlock(nn.Module):
    """XCiT's LPI: tokens in, ``forward(x, H, W)`` reshapes them to a map with the sizes its parent passes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape
        out = self.bn(self.conv(x.permute(0, 2, 1).reshape(B, C, H, W)))
        return out.reshape(B, C, N).permute(0, 2, 1)


class BranchOnSize(TokenBlock):
    def forward(self, x, H: int, W: int):
        if H > 1:  # a branch on the size: tracing must specialise on it
            x = x * 2
        return super().forward(x, H, W)


class TokenNet(nn.Module):
    def __init__(self, block: type, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 4, stride=4)
        self.blocks = nn.ModuleList(block(channels) for _ in range(2))

    def forward(self, x):
        x = self.stem(x)
        H, W = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x, H, W)
        return x.mean(1)


def test_size_arguments_stay_arguments_unless_the_forward_branches_on_them(tmp_path):
    model = TokenNet(TokenBlock).eval()
    injected, report = _inject(model, _recipe(tmp_path, {TokenBlock: "bn"}))
    assert len(report.plan.sites) == 2 and report.plan.sites[0].fixed_args == {"H": 4, "W": 4}
    for size in ((16, 16), (32, 48)):  # runs at any input size, as the base model does
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(injected(x), model(x), rtol=0, atol=0)
    scripted = torch.jit.script(injected)
    torch.testing.assert_close(scripted(torch.randn(1, 3, 24, 40)).shape, torch.Size([1, 8]))
    branching = TokenNet(BranchOnSize).eval()
    injected, report = _inject(branching, _recipe(tmp_path, {BranchOnSize: "bn"}))
    assert len(report.plan.sites) == 2
    _assert_identity(branching, injected)
    with pytest.raises(Exception, match="specialized"):  # another size fails loudly, never takes another branch
        injected(torch.randn(1, 3, 32, 32))


def test_one_check_per_block_configuration(monkeypatch):
    checks = []
    check = se_inject.engine.verify.check_site
    monkeypatch.setattr(se_inject.engine.verify, "check_site", lambda *a: checks.append(a[1].path) or check(*a))
    _, report = se_inject.inject("torchvision:resnet18", device="meta", seed=0)
    assert len(report.plan.sites) == 8
    # layer1.0 and layer1.1 are alike; each later stage has a downsampling first block and a plain second one
    assert checks == ["layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


@pytest.mark.parametrize(("rates", "checks"), [((0.1, 0.2, 0.3), 1), ((0.0, 0.2, 0.3), 2)])
def test_stochastic_depth_rates_do_not_multiply_checks(monkeypatch, rates, checks):
    """Blocks differing only in a child's float setting (timm's rising drop-path rates) are checked once; a rate of
    0 (the child may hand back its input) is another configuration."""
    import timm

    calls = []
    check = se_inject.engine.verify.check_site
    monkeypatch.setattr(se_inject.engine.verify, "check_site", lambda *a: calls.append(a[1].path) or check(*a))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), *(
        timm.models.resnet.BasicBlock(32, 32, drop_path=timm.layers.DropPath(r) if r else None) for r in rates))
    _, report = se_inject.inject(model, seed=0, input_size=16)
    assert len(report.plan.sites) == 3 and len(calls) == checks


def test_verification_leaves_the_users_model_alone():
    model = randomize_norm_stats(se_inject.build_model(se_inject.resolve_model("timm:test_resnet")))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.inject(model, seed=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


_CALLS = {"dla": [{}, {"shortcut": None}, {"shortcut": "tensor"}], "flag": [{}, {"residual": True}], "tuple": [{}]}
_PLACES = {DlaBlock: ["conv1", "bn1", "bn2", "."], FlagBlock: ["conv", "bn", "."], TupleBlock: ["conv", "bn", "."]}


@st.composite
def _models(draw):
    blocks = draw(st.lists(st.sampled_from(sorted(_CALLS)), min_size=1, max_size=4))
    return [(kind, draw(st.sampled_from(_CALLS[kind]))) for kind in blocks]


def test_identity_init_reproduces_the_base_model_or_refuses(tmp_path):
    outcomes: Counter[str] = Counter()

    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(blocks=_models(), places=st.fixed_dictionaries({c: st.sampled_from(p) for c, p in _PLACES.items()}),
           attention=st.sampled_from(["se", "eca", "cbam"]))
    def run(blocks, places, attention):
        model = randomize_norm_stats(Net(blocks))
        try:
            injected, report = _inject(model, _recipe(tmp_path, places), attn_layer=attention)
        except NoSitesError as e:
            outcomes[f"refused: {e.reason}"] += 1
            return
        outcomes["injected"] += 1
        assert len(report.plan.sites) + len(report.skipped) == len(blocks)
        _assert_identity(model, injected)

    run()
    assert set(outcomes) <= {"injected", "refused: unverified", "refused: ineligible"}, outcomes
    assert outcomes["injected"] >= sum(outcomes.values()) // 2, outcomes


def test_a_channels_last_map_takes_the_token_layer_at_every_size(tmp_path):
    """A recipe anchored on a Linear layer's output in a ConvNeXt block takes a channels-last (N, H, W, C) map: the
    site is planned channels-last and gets the token layer (squeeze over H, W; scale along the last axis), which
    verification accepts at every stage (it used to be an NCHW layer refused by verification; tests/test_tokens.py).
    The NCHW place after the permute back is the default."""
    recipe = tmp_path / "cl.toml"
    recipe.write_text('name = "cl"\n[[blocks]]\nclasses = ["timm.models.convnext.ConvNeXtBlock"]\nafter = "mlp"\n')
    model, report = se_inject.inject("timm:test_convnext", device="meta", seed=0, recipes=["cl", recipe])
    blocks = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert len(report.plan.sites) == len(blocks) and all(s.attention.channels_last for s in report.plan.sites)
    assert [s.channels for s in report.plan.sites] == [b.mlp.fc2.out_features for b in blocks]
    ok = tmp_path / "ok.toml"  # the same blocks' NCHW map (after the permute back) is taken at every stage
    ok.write_text('name = "ok"\n[[patterns]]\npattern = "residual"\nclasses = ["timm.models.convnext.ConvNeXtBlock"]\n')
    model, report = se_inject.inject("timm:test_convnext", device="meta", seed=0, recipes=["ok", ok])
    blocks = [p for p, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert [s.path for s in report.plan.sites] == blocks and not report.skipped


def test_channels_last_blocks_are_checked_on_small_maps(monkeypatch):
    """SAM's blocks take (N, H, W, C) tokens and some attend globally: checked at the recorded 64x64 tokens, the
    ViT-H's global attention took gigabytes (the scan's OOM kill). Its height and width shrink, not its W and C."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    shapes = []
    run = se_inject.engine.verify._run_modes
    monkeypatch.setattr(se_inject.engine.verify, "_run_modes",
                        lambda block, inputs: shapes.append(tuple(inputs[0][0].shape)) or run(block, inputs))
    model = VisionTransformerSAM(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, window_size=4,
                                 global_attn_indexes=(1,), use_rel_pos=True, neck_chans=32, num_classes=10)
    _, report = se_inject.inject(model, device="meta", seed=0, input_size=128)
    assert len(report.plan.sites) == 2 and not report.skipped
    runs = [s for s in shapes if s[-1] == 64]  # the others: W and C halved (the NCHW guess), failing at once
    assert runs and all(s[1:3] == (4, 4) for s in runs), shapes  # 8x8 tokens, checked at 4x4


def test_a_check_too_heavy_at_the_recorded_size_is_refused_unrun(monkeypatch):
    """Token blocks cannot be checked on shrunk maps: one whose check would take more than `CHECK_FLOPS` a pass
    (sapiens2's 5B ViT: 1,350 GFLOP, past the scan's alarm) is refused with the reason, before it runs. Blocks
    checked on shrunk maps are not concerned."""
    runs, counted = [], []
    run, count = se_inject.engine.verify._run_modes, se_inject.engine.verify.check_flops
    monkeypatch.setattr(se_inject.engine.verify, "_run_modes", lambda *a: runs.append(1) or run(*a))
    monkeypatch.setattr(se_inject.engine.verify, "check_flops", lambda *a: counted.append(count(*a)) or counted[-1])
    _, report = se_inject.inject("timm:test_vit", device="meta", seed=0)
    assert report.plan.sites and runs and min(counted) > 0
    monkeypatch.setattr(se_inject.engine.verify, "CHECK_FLOPS", min(counted) - 1)
    runs.clear()
    with pytest.raises(NoSitesError, match="GFLOP a pass, more than the verifier's"):
        se_inject.inject("timm:test_vit", device="meta", seed=0)
    assert not runs
    _, report = se_inject.inject("torchvision:resnet18", device="meta", seed=0)  # maps of 56 to 14 shrink; 7 not
    assert [s.path for s in report.plan.sites] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                                   "layer3.1", "layer4.0"] and runs


def test_blocks_whose_inputs_do_not_widen_are_checked_at_the_recorded_batch():
    """TNT's blocks take a pixel stream of (batch x patches, pixels, C) next to the patch tokens: widened to batch 2
    the two no longer fit, and every site was refused ("the block fails on recorded inputs"). The recorded batch of
    1 is the last check."""
    from timm.models.tnt import TNT

    model = TNT(img_size=64, patch_size=16, embed_dim=64, inner_dim=16, depth=2, num_heads_inner=2,
                num_heads_outer=2, num_classes=10)
    _, report = se_inject.inject(model, device="meta", seed=0, input_size=64)
    assert [s.path for s in report.plan.sites] == ["blocks.0", "blocks.1"] and not report.skipped
