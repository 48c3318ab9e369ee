"""Fusing blocks around the attention module: the residual addition inside the scaling pass, and the squeeze taken
from conv3's input under torch.compile. Both change how, not what, the block computes."""

from __future__ import annotations

import copy
import linecache

import pytest
import timm
import torch
import torchvision
from torch import nn

import se_inject
from se_inject.engine.fusion import squeeze_through


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Trained-like BN statistics (timm zero-initialises the last BN of each block, which would hide errors)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model


def _unfused(model: nn.Module) -> nn.Module:
    """A copy whose rewritten blocks run their original class's forward: a filled slot calls the module on its
    own, with the residual addition after it, as timm's own SE models do."""
    model = copy.deepcopy(model)
    for m in model.modules():
        base = getattr(type(m), "__se_inject_base__", None)
        if base is not None and any(n == "se" for n, _ in m.named_children()):
            m.__class__ = base
    return model


@pytest.fixture(scope="module", params=["se", "ese", "eca"])
def fused_and_plain(request):
    base = _randomise_norms(timm.create_model("test_resnet").eval())
    fused, _ = se_inject.inject(base, se_inject.Settings(attn_layer=request.param), seed=0)
    fused = _randomise_norms(fused)  # also the identity-ish SE weights' neighbours: non-trivial gates
    return fused, _unfused(fused)


def test_residual_blocks_are_fused_and_compute_the_same(fused_and_plain):
    fused, plain = fused_and_plain
    rewritten = [m for m in fused.modules() if hasattr(type(m), "__se_inject_base__")]
    assert rewritten and all(type(b) is not type(p) for b, p in zip(fused.modules(), plain.modules(), strict=True)
                             if b in rewritten)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the in-place path: shortcut + x * s written into x
        torch.testing.assert_close(fused(x), plain(x))


def test_fused_gradients_equal_the_unfused_ones(fused_and_plain):
    fused, plain = (copy.deepcopy(m).train() for m in fused_and_plain)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for m in (fused, plain):
        m(x).square().sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in fused.named_parameters():
        scale = grads[name].abs().max().item()  # train-mode BN amplifies rounding: tolerances follow the scale
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
def test_compiled_fused_model_uses_the_narrow_squeeze_and_agrees(fused_and_plain):
    fused, plain = fused_and_plain
    graphs = []

    def capture(gm, example_inputs):  # a backend that keeps dynamo's graph and runs it as it is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=capture, fullgraph=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x))
    torch._dynamo.reset()
    # the narrow squeeze ends in a batch norm of (N, C) descriptors; the model's own norms see (N, C, H, W) maps
    norms = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.batch_norm]
    assert any(n.args[0].meta["example_value"].dim() == 2 for n in norms)


def test_fused_model_runs_under_autocast(fused_and_plain):
    fused, plain = fused_and_plain
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for grad in (False, True):  # the in-place and the autograd path
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fused(x).float(), plain(x).float(), rtol=0.05, atol=0.05)


def test_in_place_only_where_it_pays(fused_and_plain):
    fused, _ = fused_and_plain
    block = next(m for m in fused.modules() if hasattr(type(m), "__se_inject_base__"))
    writes = []
    block.se.register_forward_hook(lambda m, args, kwargs, out: writes.append(out is args[0]), with_kwargs=True)
    with torch.no_grad():
        for batch, layout in [(2, torch.contiguous_format), (2, torch.channels_last), (1, torch.contiguous_format),
                              (1, torch.channels_last)]:
            block(torch.randn(batch, block.conv1.in_channels, 8, 8).contiguous(memory_format=layout))
    block(torch.randn(2, block.conv1.in_channels, 8, 8))  # autograd on: never in place
    assert writes == [True, True, True, False, False]  # a single channels_last map measured slower in place


def _conv_bn(c_in: int, c_out: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv, bn = nn.Conv2d(c_in, c_out, 1, bias=True), _randomise_norms(nn.BatchNorm2d(c_out))
    return conv, bn.eval()


def _squeeze(h, conv, bn):
    return squeeze_through(h, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                           bn.training)


def test_squeeze_through_conv_and_norm_is_the_mean_of_their_output(monkeypatch):
    conv, bn = _conv_bn(16, 64)
    h = torch.randn(2, 16, 32, 32)
    assert _squeeze(h, conv, bn) is None  # eager: the direct mean is as fast
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        torch.testing.assert_close(_squeeze(h, conv, bn), bn(conv(h)).mean((2, 3)))
        assert _squeeze(torch.randn(1, 16, 1, 1), conv, bn) is None  # a tiny map: not worth the matrix
        bn.train()
        assert _squeeze(h, conv, bn) is None  # batch statistics: not an affine map known in advance


def test_only_plain_1x1_conv_and_norm_chains_pass_a_squeeze():
    model = torchvision.models.resnet50()
    model.layer1[0].conv3 = nn.Conv2d(64, 256, 1, stride=1, padding=0, groups=2, bias=False)  # grouped: not fused
    injected, _ = se_inject.inject(model, seed=0)
    code = {name: type(m).forward.__code__ for name, m in injected.named_modules() if name.count(".") == 1}
    sources = {name: "".join(linecache.getlines(c.co_filename)) for name, c in code.items()}
    assert "squeeze_through" not in sources["layer1.0"] and "residual = " in sources["layer1.0"]
    assert "squeeze_through" in sources["layer1.1"]


def test_blocks_alike_are_traced_once(tmp_path, monkeypatch):
    """The rewritten class is reused for blocks of the same configuration; a block configured differently (here a
    downsampling one) is traced for itself."""
    import torchvision

    import se_inject.engine.surgery

    traced = []
    trace = se_inject.engine.surgery._trace
    monkeypatch.setattr(se_inject.engine.surgery, "_rewrites", {})
    monkeypatch.setattr(se_inject.engine.surgery, "_trace", lambda block, *a: traced.append(block) or trace(block, *a))
    recipe = tmp_path / "basic.toml"
    recipe.write_text('name = "basic"\n[[blocks]]\nclasses = ["torchvision.models.resnet.BasicBlock"]\nafter = "bn2"\n')
    down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, stride=2), torch.nn.BatchNorm2d(32))
    blocks = [torchvision.models.resnet.BasicBlock(16, 16) for _ in range(3)]
    stem = torch.nn.Conv2d(3, 16, 3, padding=1)
    model = torch.nn.Sequential(stem, *blocks, torchvision.models.resnet.BasicBlock(16, 32, 2, down)).eval()
    injected, report = se_inject.inject(model, recipes=["basic", recipe], input_size=16, seed=0)
    assert len(report.plan.sites) == 4 and len(traced) == 2
    assert len({type(injected[i]) for i in range(1, 5)}) == 2 and type(injected[1]) is type(injected[3])


class LoopBlock(torch.nn.Module):
    """HGNetV2-style: the forward loops over a ModuleList whose length differs between blocks of one class."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers))
        self.aggregation = torch.nn.Sequential(torch.nn.Conv2d(channels * (layers + 1), channels, 1))

    def forward(self, x):
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        return self.aggregation(torch.cat(outputs, 1)) + x


def test_blocks_of_one_class_with_different_loops_get_their_own_rewrite(tmp_path):
    recipe = tmp_path / "loop.toml"
    recipe.write_text(f'name = "loop"\n[[blocks]]\nclasses = ["{LoopBlock.__module__}.LoopBlock"]\n'
                      'after = "aggregation"\n')
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), LoopBlock(8, 2), LoopBlock(8, 3)).eval()
    injected, report = se_inject.inject(model, se_inject.Settings(init="identity"), recipes=["loop", recipe],
                                        input_size=16, seed=0)
    assert [s.path for s in report.plan.sites] == ["1", "2"] and not report.skipped
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(injected(x), model(x), rtol=0, atol=0)
