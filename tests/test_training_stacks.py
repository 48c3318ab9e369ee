"""Rewritten blocks in the training stacks people use: DistributedDataParallel, timm's gradient checkpointing,
torch.compile with autograd, channels_last and CPU bfloat16 autocast, in training mode with gradients. Forward-only
compile, channels_last and autocast checks live with the fine-tuning and fusion tests."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject.layers.attention import is_attention


@pytest.fixture(scope="module")
def paper_resnet():
    """timm's test_resnet with SE at the paper's init (non-zero gradients in every SE parameter), in training mode:
    ``(model, base)``; tests copy it before changing it."""
    base = timm.create_model("test_resnet", zero_init_last=False)  # timm's zeroed last norm would stop the gradients
    model, report = se_inject.inject(base, se_inject.Settings(init="paper"), seed=0, input_size=64)
    assert any(hasattr(type(model.get_submodule(s.path)), "__se_inject_base__") for s in report.plan.sites)
    return model.train(), base


def _se_modules(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if is_attention(m)]
    assert found
    return found


def _grads(model: nn.Module, x: torch.Tensor, run: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The gradients of `model`'s parameters after a backward pass through `run` (default: `model`) on `x`."""
    model.zero_grad(set_to_none=True)
    (model if run is None else run)(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=rtol * grad.abs().max().item(), msg=name)


def test_timm_gradient_checkpointing_recomputes_the_rewritten_blocks(paper_resnet):
    model = copy.deepcopy(paper_resnet[0]).eval()  # eval: recomputed norms see the same statistics
    calls = []
    for m in _se_modules(model):
        m.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = _grads(model, x)
    once = len(calls)
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, x)
    assert len(calls) - once == 2 * once  # every SE ran again in the backward pass: the blocks were checkpointed
    _assert_grads_close(checkpointed, plain, rtol=1e-5)


def test_channels_last_training_matches_contiguous(paper_resnet):
    model = copy.deepcopy(paper_resnet[0])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    contiguous = _grads(model, x)
    cl = model.to(memory_format=torch.channels_last)
    _assert_grads_close(_grads(cl, x.contiguous(memory_format=torch.channels_last)), contiguous)


def test_bfloat16_autocast_training_follows_float32(paper_resnet):
    model = copy.deepcopy(paper_resnet[0])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    out.float().square().mean().backward()
    for m in _se_modules(model):  # gradients reach every SE parameter, finite
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in m.parameters())


@pytest.mark.slow
def test_torch_compile_training_matches_eager(paper_resnet):
    model = copy.deepcopy(paper_resnet[0]).eval()  # eval norms: no buffer updates to diverge between the two runs
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    eager = _grads(model, x)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        _assert_grads_close(_grads(model, x, compiled), eager, rtol=1e-5)
    finally:
        torch._dynamo.reset()


_DDP_SCRIPT = textwrap.dedent('''
    import datetime, json, sys
    import timm, torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel

    import se_inject
    from se_inject.layers.attention import is_attention

    def se_parameters(model):
        paths = [p + "." for p, m in model.named_modules() if is_attention(m)]
        return [n for n, _ in model.named_parameters() if n.startswith(tuple(paths))]

    def worker(rank, store, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=120))
        torch.manual_seed(0)  # the same weights on both ranks, as DDP makes them
        base = timm.create_model("test_resnet", zero_init_last=False)
        model, report = se_inject.inject(base, se_inject.Settings(init="paper"), seed=0, input_size=32)
        model.eval()  # eval norms: the gradient of the mean loss is the mean of the ranks' gradients
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
        names = se_parameters(model)
        model(x).square().mean().backward()  # this rank's own gradients, averaged by hand
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in expected.values():
            dist.all_reduce(g)
            g /= 2
        model.zero_grad(set_to_none=True)
        ddp = DistributedDataParallel(model)
        ddp(x).square().mean().backward()
        worst = 0.0
        for n, p in model.named_parameters():
            scale = expected[n].abs().max().item()  # DDP sums in buckets: equal up to float rounding
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
            both = [torch.empty_like(p.grad) for _ in range(2)]
            dist.all_gather(both, p.grad)
            worst = max(worst, (both[0] - both[1]).abs().max().item())
        if rank == 0:
            json.dump({"sites": len(report.plan.sites), "se_params": len(names), "worst": worst,
                       "nonzero": sum(bool(expected[n].abs().sum()) for n in names)}, open(out, "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
''')


@pytest.mark.slow
def test_ddp_synchronises_se_gradients_across_two_processes(tmp_path):
    """Two gloo processes on the CPU: DDP wraps the injected model without unused-parameter errors, and every
    parameter's gradient (the SE modules' included) is the same on both ranks and the mean of the ranks' own."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    model, _ = se_inject.inject("timm:test_resnet", se_inject.Settings(init="paper"), device="meta", seed=0,
                                input_size=32)
    se_params = [n for m in model.modules() if is_attention(m) for n, _ in m.named_parameters()]
    assert result["se_params"] == len(se_params) > 0
    assert result["nonzero"] == result["se_params"]  # SE gradients were there to synchronise
    assert result["worst"] == 0.0
