"""Run-time cost of the SE block: base resnet50 vs se-inject's SE-ResNet-50 vs timm's own seresnet50.

One process run, eval mode, ``torch.inference_mode``, float32, fixed threads, warm-up, paired interleaved rounds
(the order rotates every round), medians with interquartile ranges; eager NCHW, eager channels_last and
torch.compile (inductor). Part 1 also times the SE formulations that were tried, on the same model.

Usage: ``python benchmarks/bench_se_runtime.py [--threads 2] [--rounds-b1 40] [--rounds-b8 12] [--no-compile]
[--comparison-only] [--compile-only] [--batches 1,8]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import warnings

import timm
import torch
import torch.nn.functional as F

import se_inject
from se_inject.layers.squeeze_excite import SqueezeExcite
from se_inject.tools.bench import interleaved, overhead

warnings.filterwarnings("ignore")


def _unfused(out, residual):
    """The block's own residual addition, as a separate pass (what an unfused block does)."""
    return out if residual is None else out + residual


class ConvFormulation(SqueezeExcite):
    """timm's SEModule formulation: 1x1 convolutions on (N, C, 1, 1), out-of-place scale."""

    def forward(self, x, residual=None, squeezed=None):
        s = self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        return _unfused(x * (s * self.gain if self.gain != 1.0 else s), residual)


class LinearFormulation(SqueezeExcite):
    """The same parameters as GEMMs on (N, C), out-of-place scale."""

    def forward(self, x, residual=None, squeezed=None):
        s = self.act(F.linear(x.mean((2, 3)), self.fc1.weight.flatten(1), self.fc1.bias))
        s = self.gate(F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias))
        return _unfused(x * (s * self.gain if self.gain != 1.0 else s)[:, :, None, None], residual)


class PoolFormulation(LinearFormulation):
    """adaptive_avg_pool2d for the squeeze instead of mean."""

    def forward(self, x, residual=None, squeezed=None):
        s = self.act(F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.fc1.weight.flatten(1), self.fc1.bias))
        s = self.gate(F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias))
        return _unfused(x * (s * self.gain if self.gain != 1.0 else s)[:, :, None, None], residual)


class InPlaceUnfused(SqueezeExcite):
    """The shipped module, but the residual addition left to the block (a second pass over the map)."""

    def forward(self, x, residual=None, squeezed=None):
        return _unfused(super().forward(x, squeezed=squeezed), residual)


class DirectSqueeze(SqueezeExcite):
    """The shipped module, but always squeezing its own input (ignores the squeeze computed from conv3's input)."""

    def forward(self, x, residual=None, squeezed=None):
        return super().forward(x, residual)


class _Stack(torch.nn.Module):
    """Runs each SE module on its own feature map (the input argument is ignored)."""

    def __init__(self, modules, maps):
        super().__init__()
        self.modules_, self.maps = modules, maps

    def forward(self, _):
        for m, x in zip(self.modules_, self.maps, strict=True):
            m(x)


def with_formulation(model, cls):
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is SqueezeExcite:
            m.__class__ = cls
    return model


def fmt(times, name, base="base"):
    median, q1, q3 = overhead(times, name, base)
    return f"{100 * median:+6.1f}% [{100 * q1:+.1f}, {100 * q3:+.1f}]"


def formulations(base, ours, rounds, compiled):
    print("\n## 1a. The 16 SE modules of SE-ResNet-50 alone, on their own feature maps (eager, NCHW): median ms")
    shapes = [(256, 56)] * 3 + [(512, 28)] * 4 + [(1024, 14)] * 6 + [(2048, 7)] * 3
    formulations = {
        "conv 1x1, x*s (timm's)": ConvFormulation,
        "linear, x*s": LinearFormulation,
        "adaptive pool + linear, x*s": PoolFormulation,
        "linear, in-place scale": SqueezeExcite,
    }
    for batch in (1, 8):
        maps = [torch.randn(batch, c, h, h) for c, h in shapes]
        stacks = {}
        for name, cls in formulations.items():
            # identity init, gain 2: every gate is exactly 1, so scaling the maps in place round after round leaves
            # them unchanged (a gate below 1 would shrink them towards slow denormals)
            modules = [SqueezeExcite(c, c // 16, gain=2.0).eval() for c, _ in shapes]
            for m in modules:
                m.init_identity()
                m.__class__, m.scale_inplace = cls, True
            stacks[name] = torch.nn.ModuleList(modules)
        runners = {name: _Stack(stack, maps) for name, stack in stacks.items()}
        times = interleaved(runners, maps[0], rounds=4 * rounds[batch], warmup=3)
        cells = [f"{name} {1e3 * statistics.median(t):.2f}" for name, t in times.items()]
        print(f"  batch {batch}  " + " | ".join(cells))

    print("\n## 1b. The same formulations inside SE-ResNet-50 (eager): overhead vs resnet50")
    variants = {
        "base": base,
        "conv 1x1, x*s (timm's)": with_formulation(ours, ConvFormulation),
        "linear, x*s": with_formulation(ours, LinearFormulation),
        "adaptive pool + linear, x*s": with_formulation(ours, PoolFormulation),
        "linear, in-place, then + shortcut": with_formulation(ours, InPlaceUnfused),
        "linear, shortcut + x*s fused (shipped)": ours.eval(),
    }
    for fmt_ in (torch.contiguous_format, torch.channels_last):
        models = {k: copy.deepcopy(m).to(memory_format=fmt_) for k, m in variants.items()}
        for batch in rounds:
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt_)
            times = interleaved(models, x, rounds=rounds[batch])
            for name in list(variants)[1:]:
                layout = "NCHW" if fmt_ == torch.contiguous_format else "channels_last"
                print(f"  {layout:13} batch {batch}  {name:40} {fmt(times, name)}")

    if compiled:
        print("\n## 1c. The squeeze under torch.compile, batch 8: from the SE input vs from conv3's input")
        variants = {"base": base, "direct squeeze": with_formulation(ours, DirectSqueeze),
                    "squeeze through conv3 (shipped)": ours}
        for fmt_ in (torch.contiguous_format, torch.channels_last):
            torch._dynamo.reset()
            runners = {k: torch.compile(copy.deepcopy(m).to(memory_format=fmt_), dynamic=False)
                       for k, m in variants.items()}
            times = interleaved(runners, torch.randn(8, 3, 224, 224).contiguous(memory_format=fmt_),
                                rounds=rounds[8], warmup=3)
            for name in list(variants)[1:]:
                layout = "NCHW" if fmt_ == torch.contiguous_format else "channels_last"
                print(f"  {layout:13} {name:34} {fmt(times, name)}")


def comparison(base, ours, reference, rounds, compiled, eager=True):
    print("\n## 2. base vs se-inject vs timm seresnet50: median overhead [IQR]; ratio = ours / timm overhead")
    print(f"  {'mode':22} {'batch':>5} {'base ms':>8} {'se-inject':>24} {'timm seresnet50':>24} {'ratio':>6}")
    modes = [("eager NCHW", False, False), ("eager channels_last", True, False)] if eager else []
    if compiled:
        modes += [("compile NCHW", False, True), ("compile channels_last", True, True)]
    for mode, channels_last, compiled in modes:
        fmt_ = torch.channels_last if channels_last else torch.contiguous_format
        models = {k: copy.deepcopy(m).to(memory_format=fmt_) for k, m in
                  (("base", base), ("ours", ours), ("timm", reference))}
        for batch in rounds:
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt_)
            runners = models
            if compiled:  # a fresh, static-shape compile per model and batch size
                torch._dynamo.reset()
                runners = {k: torch.compile(m, dynamic=False) for k, m in models.items()}
            times = interleaved(runners, x, rounds=rounds[batch], warmup=3)
            ratio = overhead(times, "ours", "base")[0] / max(overhead(times, "timm", "base")[0], 1e-9)
            print(f"  {mode:22} {batch:5d} {1e3 * statistics.median(times['base']):8.1f} "
                  f"{fmt(times, 'ours'):>24} {fmt(times, 'timm'):>24} {ratio:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds-b1", type=int, default=40)
    parser.add_argument("--rounds-b8", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--comparison-only", action="store_true", help="skip part 1 (the formulations)")
    parser.add_argument("--compile-only", action="store_true", help="part 2 under torch.compile only")
    parser.add_argument("--batches", default="1,8", help="batch sizes of part 2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # three models share timm's ResNet.forward
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"timm {timm.__version__}, python {sys.version.split()[0]}")
    base = timm.create_model("resnet50").eval()
    for m in base.modules():  # trained-like norms: timm zero-initialises bn3, which would make the SE inputs all 0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    ours, _ = se_inject.inject(base, seed=0)
    reference = timm.create_model("seresnet50").eval()
    reference.load_state_dict(ours.state_dict())  # same weights: only the SE implementation differs
    rounds = {1: args.rounds_b1, 8: args.rounds_b8}
    if not (args.comparison_only or args.compile_only):
        formulations(base, ours, rounds, compiled=not args.no_compile)
    batches = {int(b): rounds.get(int(b), args.rounds_b8) for b in args.batches.split(",")}
    comparison(base, ours, reference, batches, compiled=not args.no_compile, eager=not args.compile_only)
    print("\n  GPU: not measured (no CUDA device in this session)" if not torch.cuda.is_available() else "")


if __name__ == "__main__":
    main()
