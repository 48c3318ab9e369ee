"""Behaviours a mutation pass (benchmarks/mutation_pass.py) found unpinned, each pinned by a fast test: an inserted
module that runs twice, or takes (or feeds) its anchor in one call only, or that a second forward path skips; a plan
whose checksum does not match, a folder saved from a model object, a tensor safetensors cannot store; a norm inside
an attention module in the counts, and counting stopped by a failure; the BatchNorm of ReXNet's own SE; a fill width
that must fit every one of a model's own SE modules; the --min-channels boundary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize_norm_stats
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import se_inject
from se_inject import CheckpointError
from se_inject.engine.coverage import check_calls
from se_inject.engine.meta import meta_copy
from se_inject.io.checkpoint import PLAN_KEY
from se_inject.layers.attention import class_path

# --- every inserted module runs exactly once per call of its block, on its anchor's output ------------------------


class Host(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A two-block model with SE after each block's `bn`, and its plan."""
    recipe = tmp_path_factory.mktemp("recipe") / "host.toml"
    recipe.write_text(f'name = "host"\n[[blocks]]\nclasses = ["{class_path(Host)}"]\nafter = "bn"\n')
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Host(), Host()).eval()
    injected, report = se_inject.inject(model, recipes=["host", recipe], input_size=16, seed=0)
    assert check_calls(injected, report.plan) == {}  # control
    return injected, report.plan


def _misbehaving(injected: nn.Module, path: str, forward) -> nn.Module:
    """A meta copy of `injected` whose block at `path` runs `forward(block, x)` instead of its rewritten forward
    (on the meta device, as check_calls runs it: a copy would rebuild the rewritten class)."""
    model = meta_copy(injected)
    block = model.get_submodule(path)
    block.__class__ = type("Misbehaving", (type(block),), {"forward": forward})
    return model


def test_a_module_that_runs_twice_per_call_of_its_block_is_found(hosted):
    injected, plan = hosted
    path = plan.sites[0].path
    rewritten = type(injected.get_submodule(path)).forward

    def twice(block, x):
        out = rewritten(block, x)
        block.se(block.bn(block.conv(x)))  # the module runs once more
        return out

    problems = check_calls(_misbehaving(injected, path, twice), plan)
    assert "runs 2 time(s) where its block runs 1 time(s)" in problems[path]


def test_a_module_off_its_anchor_in_one_call_of_two_is_found(hosted):
    """The block runs twice per forward (shared by its parent); the module takes `bn`'s output in the first call
    only: every call must take it, not any."""
    injected, plan = hosted
    site = plan.sites[0]
    rewritten = type(injected.get_submodule(site.path)).forward

    def alternating(block, x):
        block.calls = getattr(block, "calls", 0) + 1
        if block.calls % 2:
            return rewritten(block, x)
        return torch.relu(block.se(block.bn(block.conv(x)) + 0) + x)  # a copy of the anchor's output

    model = _misbehaving(injected, site.path, alternating)
    model.append(model.get_submodule(site.path))  # the same block again: two calls per forward
    problems = check_calls(model, replace(plan, sites=(site,)))
    assert "does not take the output of 'bn'" in problems[site.path]


def test_a_module_before_its_anchor_that_feeds_it_in_one_call_of_two_is_found(tmp_path):
    """With SE before `bn`, every call of `bn` must take the module's output, not any."""
    recipe = tmp_path / "before.toml"
    recipe.write_text(f'name = "before"\n[[blocks]]\nclasses = ["{class_path(Host)}"]\nbefore = "bn"\n')
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Host()).eval()
    injected, report = se_inject.inject(model, recipes=["before", recipe], input_size=16, seed=0)
    site = report.plan.sites[0]
    assert site.position == "before" and check_calls(injected, report.plan) == {}  # control
    rewritten = type(injected.get_submodule(site.path)).forward

    def alternating(block, x):
        block.calls = getattr(block, "calls", 0) + 1
        if block.calls % 2:
            return rewritten(block, x)
        return torch.relu(block.bn(block.se(block.conv(x)) + 0) + x)  # bn takes a copy of the module's output

    broken = _misbehaving(injected, site.path, alternating)
    broken.append(broken.get_submodule(site.path))
    assert "'bn' does not take the output of" in check_calls(broken, report.plan)[site.path]


class Tapped(Host):
    """timm's ``forward_with_tap``: a second forward of the block, which a model's forward_intermediates runs."""

    def forward_with_tap(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class TappedNet(nn.Sequential):
    def forward_intermediates(self, x):
        x = self[0](x)
        for block in self[1:]:
            x = block.forward_with_tap(x)
        return x, []


def test_a_site_a_second_forward_path_skips_is_refused(tmp_path):
    recipe = tmp_path / "tapped.toml"
    recipe.write_text(f'name = "tapped"\n[[blocks]]\nclasses = ["{class_path(Tapped)}"]\nafter = "bn"\n')
    model = TappedNet(nn.Conv2d(3, 8, 3, padding=1), Tapped()).eval()
    with pytest.raises(se_inject.NoSitesError, match="forward_intermediates"):
        se_inject.inject(model, recipes=["tapped", recipe], input_size=16, seed=0)


def test_check_calls_also_runs_the_other_forward_paths(hosted):
    """`load`'s check (check_calls) runs forward_intermediates too, where a block has a second forward."""
    from se_inject.engine.surgery import apply_plan

    _, plan = hosted
    plan = replace(plan, sites=(replace(plan.sites[0], block=class_path(Tapped)),))
    applied = apply_plan(meta_copy(TappedNet(nn.Conv2d(3, 8, 3, padding=1), Tapped())), plan, inplace=True)
    assert "in forward_intermediates" in check_calls(applied, plan)[plan.sites[0].path]


# --- a saved plan is checked against its checksum ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=0)
    directory = tmp_path_factory.mktemp("saved") / "out"
    se_inject.save(model, report, directory)
    return directory


def _tampered(directory: Path, target: Path) -> Path:
    """The folder's model.safetensors with one plan field edited and neither checksum nor digest updated."""
    target.mkdir()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert '"paper"' in meta[PLAN_KEY]
    save_file(load_file(str(directory / "model.safetensors")), str(target / "model.safetensors"),
              metadata={**meta, PLAN_KEY: meta[PLAN_KEY].replace('"paper"', '"identity"')})
    return target


def test_an_edited_plan_fails_its_checksum_even_without_the_weights_digest(saved, tmp_path):
    bad = _tampered(saved, tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"plan in its metadata was modified \(checksum mismatch\)"):
        se_inject.read_plan(bad)
    with pytest.raises(CheckpointError, match=r"checksum mismatch"):
        se_inject.load(bad, verify_weights=False)


def test_a_folder_saved_from_a_model_object_needs_the_model(tmp_path):
    model, report = se_inject.inject(timm.create_model("test_resnet"), seed=0, input_size=32)
    se_inject.save(model, report.plan, tmp_path / "out")
    with pytest.raises(CheckpointError, match="saved from a model object; pass the base model"):
        se_inject.load(tmp_path / "out")


def test_a_tensor_safetensors_cannot_store_is_a_typed_error(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", seed=0)
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(se_inject.SEInjectError, match=r"phase: dtype torch\.complex64 has no safetensors code"):
        se_inject.save(model, report.plan, tmp_path / "out")


# --- counting: every op inside an attention module, its norms included ----------------------------------------


def test_a_norm_inside_an_attention_module_is_counted():
    """timm's SEModule with a BatchNorm on its bottleneck (ReXNet's): the norm's rd outputs add to its count."""
    from se_inject.engine.measure import count

    def ops(norm_layer):
        se = timm.layers.SEModule(16, rd_channels=8, norm_layer=norm_layer)
        return count(nn.Sequential(nn.Conv2d(3, 16, 1), se), (3, 4, 4)).attention_elementwise["1"]

    assert ops(nn.BatchNorm2d) - ops(None) == 8


def test_counting_stops_cleanly_when_a_counted_module_fails():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from se_inject.engine.measure import ElementwiseCounter

    class Fails(nn.Module):
        def forward(self, x):
            x = x * 2
            raise RuntimeError("boom")

    module, x = Fails(), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="boom"), ElementwiseCounter({"m": module}) as counter:
        module(x)
    assert counter.ops == {"m": 6} and not counter.tallying()  # counted up to the failure
    assert not _get_current_dispatch_mode_stack()


# --- fill: the family's own SE, BatchNorm and width included ------------------------------------------------------


def test_rexnet_fill_keeps_its_se_batchnorm_and_computes_what_timms_own_se_does():
    """ReXNet's SE has a BatchNorm on the bottleneck (timm ``SEModule(norm_layer=nn.BatchNorm2d)``): a filled
    module has its keys and, with the same non-trivial weights and statistics, its outputs."""
    model = timm.create_model("rexnet_100", width_mult=0.5).eval()
    injected, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, input_size=32)
    site = report.plan.sites[0]
    filled = injected.get_submodule(site.module_path)
    own = timm.layers.SEModule(site.channels, rd_channels=site.squeeze_channels, norm_layer=nn.BatchNorm2d).eval()
    assert {k: v.shape for k, v in filled.state_dict().items()} == {k: v.shape for k, v in own.state_dict().items()}
    randomize_norm_stats(own)
    with torch.no_grad():
        for p in own.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    filled.load_state_dict(own.state_dict())
    x = torch.randn(2, site.channels, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(filled.eval()(x.clone()), own(x), rtol=0, atol=1e-6)


def test_a_fill_width_fits_every_one_of_the_models_own_se_modules():
    """Own SE at 64 channels squeezing to 4 and at 128 squeezing to 8: round(C / 16) fits both, the recipe's default
    (C / 16 to a multiple of 8) only the second, so the 64-channel block without SE gets 4."""
    model = timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [2, 1, 1, 1], num_classes=10)
    model.layer1[0].se = timm.layers.SEModule(64, rd_channels=4)
    model.layer2[0].se = timm.layers.SEModule(128, rd_channels=8)
    _, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, input_size=32)
    assert [(s.path, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        ("layer1.1", 64, 4), ("layer3.0", 256, 16), ("layer4.0", 512, 32)]


# --- filters --------------------------------------------------------------------------------------------------------


def test_min_channels_keeps_a_site_of_exactly_that_many_channels():
    _, report = se_inject.inject("torchvision:resnet18", se_inject.Settings(min_channels=64), device="meta", seed=0)
    assert len(report.plan.sites) == 8  # layer1's 64-channel blocks included
    _, report = se_inject.inject("torchvision:resnet18", se_inject.Settings(min_channels=65), device="meta", seed=0)
    assert [s.path for s in report.plan.sites][:1] == ["layer2.0"] and len(report.plan.sites) == 6
