"""se-inject on a CUDA device: correctness checks first, then the run-time cost of SE-ResNet-50.

Checks (each prints PASS/FAIL with its number): surgery on a model already on the GPU puts every new module on the
GPU; ``init="identity"`` reproduces the base outputs on the GPU; the GPU and CPU give the same injected outputs (to
float rounding); autocast (bfloat16) and channels_last run; save -> load round-trips on the GPU; the fused residual
path equals the unfused one in training mode with autograd.

Timing: base resnet50 vs se-inject's SE-ResNet-50 vs timm's seresnet50 with the same weights, eager float32 NCHW,
eager bfloat16 autocast channels_last, at two batch sizes; paired interleaved rounds
(`se_inject.tools.bench.interleaved`), median overhead over the base with its interquartile range. Ratios only
mean something within one run.

Usage: ``python benchmarks/bench_gpu.py [--rounds 30] [--batches 32,128]`` (exits 2 without CUDA).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile

import timm
import torch

import se_inject
from se_inject.tools.bench import interleaved, overhead

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if not ok:
        FAILURES.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm statistics: timm zero-initialises bn3, which would make every SE input exactly 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def checks(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    print("\n## Correctness on", torch.cuda.get_device_name(device))
    base_cpu = trained_like(timm.create_model("resnet50")).eval()
    base = copy.deepcopy(base_cpu).to(device)
    x = torch.randn(4, 3, 224, 224, device=device)

    ident, _ = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0)
    devices = {p.device.type for p in ident.parameters()} | {b.device.type for b in ident.buffers()}
    check("new modules on the model's device", devices == {"cuda"}, f"devices {sorted(devices)}")
    with torch.inference_mode():
        err = rel(ident(x), base(x))
    check("identity init reproduces the base on CUDA", err < 1e-6, f"relative L2 {err:.2e}")

    ours, report = se_inject.inject(base, seed=0)
    ours_cpu, _ = se_inject.inject(base_cpu, seed=0)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 for this check
    with torch.inference_mode():
        gpu_out, cpu_out = ours(x), ours_cpu(x.cpu())
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    err = rel(gpu_out.cpu(), cpu_out)
    check("CUDA equals CPU (same plan, same seed, TF32 off)", err < 1e-5, f"relative L2 {err:.2e}")

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        amp_out = cl(x.contiguous(memory_format=torch.channels_last))
    err = rel(amp_out, gpu_out)
    check("bfloat16 autocast + channels_last", err < 5e-2, f"relative L2 {err:.2e} vs float32, dtype {amp_out.dtype}")

    with tempfile.TemporaryDirectory() as tmp:
        se_inject.save(ours, report, f"{tmp}/out")
        loaded = se_inject.load(f"{tmp}/out", model=copy.deepcopy(base_cpu)).to(device)
        with torch.inference_mode():
            err = rel(loaded(x), ours(x))
    check("save -> load -> CUDA", err < 1e-6, f"relative L2 {err:.2e}")

    train = copy.deepcopy(ours).train()
    y = x.clone().requires_grad_(True)
    train(y).square().mean().backward()
    grads = [p.grad for p in se_inject.new_parameters(train)] if hasattr(se_inject, "new_parameters") else []
    finite = all(g is not None and torch.isfinite(g).all().item() for g in grads)
    check("training step: SE parameters get finite gradients", finite and bool(grads), f"{len(grads)} tensors")
    return base, ours


def timing(base: torch.nn.Module, ours: torch.nn.Module, batches: list[int], rounds: int) -> None:
    device = next(base.parameters()).device
    reference = timm.create_model("seresnet50").eval().to(device)
    reference.load_state_dict(ours.state_dict())
    print("\n## base resnet50 vs se-inject vs timm seresnet50: median overhead over the base [IQR]")
    print(f"  {'mode':28} {'batch':>5} {'base ms':>8} {'se-inject':>24} {'timm seresnet50':>24}")
    for mode in ("eager fp32 NCHW", "eager bf16 autocast channels_last"):
        amp = "bf16" in mode
        fmt = torch.channels_last if "channels_last" in mode else torch.contiguous_format
        models = {k: copy.deepcopy(m).to(memory_format=fmt) for k, m in
                  (("base", base), ("ours", ours), ("timm", reference))}
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                times = interleaved(models, x, rounds=rounds, warmup=5, repeat=5)

            def cell(name: str, times: dict[str, list[float]] = times) -> str:
                median, q1, q3 = overhead(times, name, "base")
                return f"{100 * median:+6.1f}% [{100 * q1:+.1f}, {100 * q3:+.1f}]"

            print(f"  {mode:28} {batch:5d} {1e3 * statistics.median(times['base']):8.2f} "
                  f"{cell('ours'):>24} {cell('timm'):>24}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="32,128")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    versions = f"torch {torch.__version__}, timm {timm.__version__}, python {sys.version.split()[0]}"
    print(f"# {platform.machine()}, {versions}")
    base, ours = checks(torch.device("cuda"))
    timing(base, ours, [int(b) for b in args.batches.split(",")], args.rounds)
    print(f"\n{len(FAILURES)} failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
