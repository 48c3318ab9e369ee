"""The engine is right by construction: caches are keyed by everything a rewrite depends on (blocks that differ in
any attribute never share a traced forward, a rewrite or a verdict), and every inserted module provably runs,
exactly once per call of its block, on the planned map, on every forward path."""

from __future__ import annotations

import enum

import pytest
import test_security as sec
import timm
import torch
from torch import nn

import se_inject
from se_inject import CheckpointError
from se_inject.engine.coverage import check_calls
from se_inject.engine.keys import BoundedCache, freeze, module_key
from se_inject.engine.surgery import apply_plan


class Order(enum.Enum):
    AB = 1
    BA = 2


class Branchy(nn.Module):
    """A residual block whose branch order is decided by one attribute of any type: a tuple, list, dict, string,
    enum, or a child's attribute (read through the child, which tracing specialises on)."""

    def __init__(self, channels: int, setting, where: str = "own"):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.where = where
        if where == "child":
            self.b.setting = setting
        else:
            self.setting = setting

    def _first_is_a(self) -> bool:
        value = self.b.setting if self.where == "child" else self.setting
        if isinstance(value, dict):
            return value["first"] == "a"
        if isinstance(value, Order):
            return value is Order.AB
        if isinstance(value, bool):
            return value
        return value[0] == "a"

    def forward(self, x):
        h = self.b(self.a(x)) if self._first_is_a() else self.a(self.b(x))
        return x + self.bn(h)


class Net(nn.Module):
    def __init__(self, first, second, where: str = "own"):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Branchy(16, first, where), Branchy(16, second, where))

    def forward(self, x):
        return self.blocks(self.stem(x))


SETTINGS = [
    pytest.param(("a",), ("b",), "own", id="tuple"),
    pytest.param(["a"], ["b"], "own", id="list"),
    pytest.param({"first": "a"}, {"first": "b"}, "own", id="dict"),
    pytest.param("ab", "ba", "own", id="str"),
    pytest.param(Order.AB, Order.BA, "own", id="enum"),
    pytest.param(True, False, "own", id="flag"),
    pytest.param(("a",), ("b",), "child", id="child-attribute"),
]


@pytest.mark.parametrize(("first", "second", "where"), SETTINGS)
def test_blocks_differing_in_one_attribute_get_their_own_rewrite(first, second, where, tmp_path):
    recipe = tmp_path / "branchy.toml"
    recipe.write_text(f'name = "branchy"\n[[blocks]]\nclasses = ["{__name__}.Branchy"]\nafter = "bn"\n')
    torch.manual_seed(0)
    net = Net(first, second, where).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    injected, report = se_inject.inject(net, se_inject.Settings(init="identity"), input_size=16, seed=0,
                                        recipes=["branchy", recipe])
    assert [s.path for s in report.plan.sites] == ["blocks.0", "blocks.1"]
    assert not [s for s in report.skipped if not s.existing]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(injected(x), net(x))  # the second block runs its own branch order, not the first's
    for i in range(2):
        block, base = injected.blocks[i], net.blocks[i]
        with torch.no_grad():
            y = torch.randn(1, 16, 8, 8)
            assert torch.equal(block(y), base(y))


def test_keys_tell_apart_what_equality_would_merge():
    assert freeze(1) != freeze(True) != freeze(1.0)
    assert freeze(0.0) != freeze(-0.0)
    assert freeze(("a",)) != freeze(["a"])
    assert freeze(Order.AB) != freeze(Order.BA)
    a, b = Branchy(8, ("a",)), Branchy(8, ("b",))
    assert module_key(a) != module_key(b)
    assert module_key(Branchy(8, ("a",))) == module_key(a)
    a.tensor_attribute = torch.zeros(1)  # a value it cannot key exactly: no key, so nothing is cached
    assert module_key(a) is None


def test_bounded_cache_evicts_the_least_recently_used():
    cache: BoundedCache[int, int] = BoundedCache(2)
    cache[1], cache[2] = 1, 2
    assert cache.get(1) == 1
    cache[3] = 3
    assert 2 not in cache and 1 in cache and 3 in cache and len(cache) == 2


def test_generated_classes_are_bounded():
    import se_inject.engine.surgery as surgery

    assert surgery._classes.maxsize <= 1024 and surgery._rewrites.maxsize <= 4096


# --- every inserted module runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    model, report = se_inject.inject("timm:test_resnet", seed=0, input_size=32)
    return model, report


def test_applied_plan_runs_every_module_once(resnet):
    model, report = resnet
    assert check_calls(model, report.plan) == {}


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("slot", "_is_full_backward_hook", "runs 0 time"),  # an attribute every module has, never called
    ("anchor", "bn1", "does not take the output of 'bn1'"),  # a real child, but not where the module is called
])
def test_a_planned_module_that_does_not_run_where_planned_is_found(resnet, field, value, expected):
    from dataclasses import replace

    _, report = resnet
    site = report.plan.sites[0]
    if field == "slot":
        site = replace(site, slot=value, name=value)
        base = timm.create_model("test_resnet", device="meta")
        applied = apply_plan(base, replace(report.plan, sites=(site,)), inplace=True)
        problems = check_calls(applied, replace(report.plan, sites=(site,)))
    else:
        model, _ = resnet
        problems = check_calls(model, replace(report.plan, sites=(replace(site, anchor=value, slot=None),)))
    assert expected in problems[site.path]


def test_channels_the_plan_claims_are_checked(resnet):
    from dataclasses import replace

    model, report = resnet
    site = report.plan.sites[0]
    wrong = replace(site, attention=replace(site.attention, channels=7))
    assert "planned for 7 channels" in check_calls(model, replace(report.plan, sites=(wrong,)))[site.path]


def test_crafted_folder_with_a_dead_module_is_refused(sec_saved, tmp_path):
    _, _, directory = sec_saved
    def dead_slot(plan):
        plan["sites"][0]["slot"] = plan["sites"][0]["name"] = "_is_full_backward_hook"

    folder = sec.craft(directory, tmp_path / "dead", dead_slot)
    with pytest.raises(CheckpointError, match="runs 0 time"):
        se_inject.load(folder)


@pytest.fixture(scope="module")
def sec_saved(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path_factory.mktemp("good") / "out"
    se_inject.save(model, report, directory)
    return model.eval(), report.plan, directory


@pytest.mark.slow
def test_a_second_forward_path_runs_every_module():
    """timm's aligned Xception has ``forward_with_tap`` (forward_intermediates, feature extraction): it must run
    every SE, so the intermediates' final map equals forward_features'."""
    model, report = se_inject.inject("xception41", se_inject.Settings(init="paper"), seed=0, input_size=64)
    model.eval()
    assert check_calls(model, report.plan) == {}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.slow
def test_a_site_skipped_by_a_second_forward_path_is_refused(tmp_path):
    """A recipe putting SE on the whole stack, which forward_with_tap does not call, has those sites refused (the
    modules whose tap feeds forward_intermediates), not shipped; the rest run on both paths."""
    recipe = tmp_path / "stack.toml"
    recipe.write_text('name = "stack"\n[[blocks]]\nclasses = ["timm.models.xception_aligned.XceptionModule"]\n'
                      'after = "stack"\nwhen = { no_skip = false }\n')
    model, report = se_inject.inject("xception41", recipes=["stack", recipe], seed=0, input_size=64)
    refused = [s for s in report.skipped if "forward_intermediates" in s.reason]
    assert refused and all("runs 0 time" in s.reason for s in refused)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
