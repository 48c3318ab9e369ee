"""Caches of traces and generated forwards are keyed by the code that ran, not the class object: a class whose
forward is patched in-process misses them (issue 28, point 4), and a module whose code or values cannot be keyed
exactly is not cached at all."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject.engine import keys, surgery, traces
from se_inject.engine.keys import module_key
from se_inject.engine.traces import trace_block

BasicBlock = timm.models.resnet.BasicBlock


def _doubled(forward):
    def forward_doubled(self, x):
        return forward(self, x) * 2

    return forward_doubled


def _unrewritten(model: nn.Module) -> nn.Module:
    """`model` with each rewritten block back in its own class (whose forward calls the slot's SE module itself)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        base = getattr(type(module), "__se_inject_base__", None)
        if base is not None:
            module.__class__ = base
    return model


@pytest.fixture
def fresh_caches(monkeypatch):
    for cache in ("_rewrites", "_slot_rewrites", "_classes"):
        monkeypatch.setattr(surgery, cache, keys.BoundedCache(1024))
    monkeypatch.setattr(traces, "_traces", keys.BoundedCache(1024))


def _check_runs_the_current_forward(model: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unrewritten(model).eval()(x))


@pytest.mark.usefixtures("fresh_caches")
def test_a_block_patched_after_inject_is_loaded_with_its_new_forward(tmp_path, monkeypatch):
    """Before: ``load`` replayed the plan from the generated class cached for the unpatched BasicBlock and silently
    ran the old forward."""
    model, report = se_inject.inject("timm:test_resnet", seed=0)
    assert any(site.slot == "se" and site.block.endswith("BasicBlock") for site in report.plan.sites)
    se_inject.save(model, report.plan, tmp_path / "out")
    monkeypatch.setattr(BasicBlock, "forward", _doubled(BasicBlock.forward))
    loaded = se_inject.load(tmp_path / "out")
    assert any(getattr(type(m), "__se_inject_base__", None) is BasicBlock for m in loaded.modules())
    _check_runs_the_current_forward(loaded)


@pytest.mark.usefixtures("fresh_caches")
def test_a_block_patched_between_two_injects_is_rewritten_anew(monkeypatch):
    """Before: the second inject reused the first one's rewrite and its verifier refused the block ("output
    differs"), blaming the block for the cache's stale forward."""
    _, first = se_inject.inject("timm:test_resnet", seed=0)
    monkeypatch.setattr(BasicBlock, "forward", _doubled(BasicBlock.forward))
    model, second = se_inject.inject("timm:test_resnet", seed=0)
    assert [s.path for s in second.plan.sites] == [s.path for s in first.plan.sites] and not second.skipped
    _check_runs_the_current_forward(model)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.body(x)

    def body(self, x):
        return x + self.conv(x)


def _scaled(x):
    return x * 3


def test_module_keys_follow_each_method_its_closure_and_the_functions_it_calls(monkeypatch):
    block = Gate()
    key = module_key(block)
    assert module_key(Gate()) == key  # alike blocks share one key
    monkeypatch.setattr(Gate, "body", lambda self, x: _scaled(self.conv(x)))  # a helper the forward calls
    patched = module_key(block)
    assert patched != key
    monkeypatch.setattr(__import__(__name__), "_scaled", lambda x: x * 4)  # a module-level function it calls
    assert module_key(block) not in (key, patched)
    monkeypatch.undo()
    assert module_key(block) == key
    monkeypatch.setattr(nn.Conv2d, "forward", _doubled(nn.Conv2d.forward))  # a child's class
    assert module_key(block) != key
    monkeypatch.undo()
    monkeypatch.setattr(Gate, "forward", _doubled(Gate.body))
    doubled = module_key(block)
    monkeypatch.setattr(Gate, "forward", _doubled(Gate.forward))  # same code, another function in the closure
    assert module_key(block) != doubled


_OFFSET = torch.ones(1)


class Offset(nn.Module):
    def forward(self, x):
        return x + _OFFSET  # a tensor: no exact key


def test_code_that_reads_an_unkeyable_value_is_not_cached():
    assert module_key(Offset()) is None
    assert module_key(nn.Sequential(nn.Identity(), Offset())) is None


class ModeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.conv(x) if self.training else self.conv(x)


def test_a_trace_is_keyed_by_the_training_flags(monkeypatch):
    """The trace of a block that branches on ``self.training`` is per mode: kills the mutant that drops the flag
    from the trace key."""
    monkeypatch.setattr(traces, "_traces", keys.BoundedCache(16))
    block = ModeBlock()
    adds = [sum(n.op == "call_function" for n in trace_block(block.train(mode)).nodes) for mode in (True, False)]
    assert adds == [1, 0]
    nested = nn.Sequential(ModeBlock()).train()
    all_training = module_key(nested)
    nested[0].eval()  # a child's flag, read through the child
    assert module_key(nested) != all_training
    assert module_key(block.train(), modes=False) == module_key(block.eval(), modes=False)


class Wrapped(nn.BatchNorm2d):
    """Not traceable by torch.fx on its own (a bare BatchNorm2d): SE is wrapped around its forward."""


def test_a_wrapped_forward_is_keyed_by_the_code_it_copies(monkeypatch):
    first = surgery._wrapped_class(Wrapped, "se", "after")
    assert surgery._wrapped_class(Wrapped, "se", "after") is first
    monkeypatch.setattr(Wrapped, "forward", _doubled(nn.BatchNorm2d.forward))
    patched = surgery._wrapped_class(Wrapped, "se", "after")
    assert patched is not first
    assert patched.se_inject_forward.__code__ is Wrapped.forward.__code__
