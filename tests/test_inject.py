"""The engine's invariants: finding changes nothing, keys and values survive, only SE keys are added, existing SE is
skipped, outputs keep their shape, and timm ResNets become exactly timm's seresnet*."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats, state_snapshot

import se_inject
from se_inject import NoSitesError
from se_inject.engine.find import find_sites
from se_inject.engine.recipe_files import resolve_recipes
from se_inject.layers.squeeze_excite import SqueezeExcite


def _meta(name: str, source: str = "timm"):
    with torch.device("meta"):
        return timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_finding_changes_nothing():
    model = timm.create_model("test_resnet")
    before = state_snapshot(model)
    classes = [type(m) for m in model.modules()]
    findings = find_sites(model, resolve_recipes(), (3, 160, 160))
    assert findings.matches
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("source", "name"), [("timm", "test_resnet"), ("torchvision", "resnet18")])
def test_original_keys_and_values_survive_and_only_se_keys_are_added(source, name):
    model = randomize_norm_stats(timm.create_model(name) if source == "timm" else torchvision.models.get_model(name))
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, seed=0)
    after = injected.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    added = set(after) - set(before)
    assert added
    assert all(".se." in k for k in added)
    assert len(added) == 4 * len(report.plan.sites)  # fc1/fc2 weight and bias
    x = torch.randn(2, 3, 64, 64)
    assert injected.eval()(x).shape == model.eval()(x).shape


def test_caller_model_untouched_unless_inplace():
    model = torchvision.models.resnet18()
    keys = set(model.state_dict())
    injected, _ = se_inject.inject(model, seed=0)
    assert injected is not model
    assert set(model.state_dict()) == keys
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    same, _ = se_inject.inject(model, seed=0, inplace=True)
    assert same is model
    assert set(model.state_dict()) > keys
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)  # class swap keeps isinstance


DEEPER = ("resnet101", "resnet152", "resnet50t", "resnet152d", "resnetaa50d")  # slow


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in DEEPER)])
def test_timm_resnet_becomes_exactly_seresnet_keys(name):
    injected, _ = se_inject.inject(f"timm:{name}", se_inject.Settings(rd_ratio=1 / 16), device="meta", seed=0)
    assert _shapes(injected) == _shapes(_meta(f"se{name}"))


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_seresnet_weights_load_strictly_and_give_identical_outputs(name):
    injected, _ = se_inject.inject(f"timm:{name}", seed=0)
    reference = randomize_norm_stats(timm.create_model(f"se{name}")).eval()
    injected.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference(x)
        # Same parameters and maths; our SE runs its FC layers as GEMMs (faster than 1x1 convolutions), so the
        # outputs agree to float rounding, relative to their magnitude.
        torch.testing.assert_close(injected.eval()(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_torchvision_resnet50_matches_seresnet50_params_and_keys():
    injected, report = se_inject.inject("torchvision:resnet50", device="meta", seed=0)
    reference = _meta("seresnet50")
    assert report.after.params == sum(p.numel() for p in reference.parameters())
    assert _shapes(injected) == _shapes(reference)  # torchvision and timm ResNets share key names


def test_torchvision_blocks_get_se_before_the_addition():
    model = torchvision.models.resnet18().eval()
    injected, _ = se_inject.inject(model, seed=0)
    block = injected.layer2[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:  # clones: later in-place ops must not reach them
        seen[name] = tensor.clone()

    hooks = [getattr(block, n).register_forward_hook(lambda m, i, o, n=n: keep(n, o))
             for n in ("bn2", "se", "downsample")]
    hooks.append(block.se.register_forward_pre_hook(
        lambda m, args, kwargs: keep("se input", args[0]) or keep("residual", kwargs["residual"]), with_kwargs=True))
    with torch.no_grad():
        out = block(torch.randn(1, 64, 32, 32))
        for h in hooks:
            h.remove()
        alone = block.se(seen["se input"].clone())  # the SE by itself: x * s
    assert torch.equal(seen["se input"], seen["bn2"])  # SE takes the last norm's output ...
    # ... and feeds the identity addition, which the fused block does inside the SE's scaling pass
    assert torch.equal(seen["residual"], seen["downsample"])
    assert torch.equal(out, torch.relu(seen["se"]))
    torch.testing.assert_close(seen["se"], alone + seen["downsample"])


def test_running_twice_inserts_nothing_and_reports_existing_se():
    injected, _ = se_inject.inject("timm:test_resnet", seed=0)
    with pytest.raises(NoSitesError, match="already have channel attention"):
        se_inject.inject(injected, seed=0)
    with pytest.raises(NoSitesError, match="already have channel attention"):
        se_inject.inject("timm:seresnet18", device="meta")


def test_output_shape_checked_on_meta():
    injected, report = se_inject.inject("timm:resnet50", device="meta", seed=0)
    assert report.after.output_shapes == report.before.output_shapes == ((1, 1000),)
    assert all(isinstance(injected.get_submodule(s.module_path), SqueezeExcite) for s in report.plan.sites)


def test_sites_are_the_residual_blocks_with_their_channels():
    _, report = se_inject.inject("timm:resnet50", device="meta", seed=0)
    sites = report.plan.sites
    assert [s.path for s in sites] == [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)]
    assert {s.path: s.channels for s in sites}["layer3.0"] == 1024
    assert {s.channels: s.squeeze_channels for s in sites} == {256: 16, 512: 32, 1024: 64, 2048: 128}


def test_no_matching_blocks_names_recipes_and_classes():
    from helpers import parallel_vit

    with pytest.raises(NoSitesError) as info:
        se_inject.inject(parallel_vit(), device="meta", input_size=32)
    assert "transformer with no convolutional block" in str(info.value)
    assert f"{len(resolve_recipes('auto'))} recipes tried" in str(info.value)  # the default set: not localvit
    assert "Attention" in str(info.value)


def test_plan_is_json_round_trippable():
    _, report = se_inject.inject("timm:test_resnet", device="meta", seed=3)
    plan = report.plan
    from se_inject.engine.schema import plan_from_json

    assert plan_from_json(plan.to_json()) == plan
    assert plan.seed == 3
    assert str(plan.model) == "timm:test_resnet"


def test_seed_recorded_when_not_given():
    _, a = se_inject.inject("timm:test_resnet", device="meta")
    _, b = se_inject.inject("timm:test_resnet", device="meta", seed=a.plan.seed)
    assert a.plan == b.plan


def test_se_modules_follow_the_model_dtype():
    model = torchvision.models.resnet18().to(torch.float64)
    injected, _ = se_inject.inject(model, seed=0)
    assert injected.layer1[0].se.fc1.weight.dtype == torch.float64
    injected.eval()(torch.randn(1, 3, 32, 32, dtype=torch.float64))
