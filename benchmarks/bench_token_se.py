"""Run-time cost of token SE: ViT-S/16 and Swin-T with and without SE (se-inject's default transformer place) on
the CPU, at batch 1 and 32, as ratios measured in one run, next to the MAC overhead the report counts.

One process, eval mode, ``torch.inference_mode``, float32, fixed threads, warm-up, paired interleaved rounds (the
order rotates every round), medians with interquartile ranges of the per-round ratio. The SE models start from the
base model's weights (identity init is not needed: the time does not depend on the values).

Usage: ``python benchmarks/bench_token_se.py [--threads 2] [--rounds 15] [--batches 1,32]
[--models vit_small_patch16_224,swin_tiny_patch4_window7_224]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings

import timm
import torch

import se_inject
from se_inject.tools.bench import interleaved, overhead

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.rounds} rounds")
    print("| model | sites | params + | MACs + | batch | base ms | SE ms | time + (median [IQR]) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base = timm.create_model(name).eval()
        injected, report = se_inject.inject(copy.deepcopy(base), seed=0)
        injected.eval()
        data = report.to_dict()
        params = data["params"]["delta"] / data["params"]["before"]
        macs = data["macs"]["delta"] / data["macs"]["before"]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, *base.pretrained_cfg["input_size"][1:])
            rounds = args.rounds if batch == 1 else max(5, args.rounds // 3)
            times = interleaved({"base": base, "se": injected}, x, rounds=rounds, warmup=2)
            median, q1, q3 = overhead(times, "se", "base")
            base_ms = sorted(times["base"])[len(times["base"]) // 2] * 1e3
            se_ms = sorted(times["se"])[len(times["se"]) // 2] * 1e3
            print(f"| {name} | {len(report.plan.sites)} | {params:+.2%} | {macs:+.3%} | {batch} | {base_ms:.1f} | "
                  f"{se_ms:.1f} | {median:+.2%} [{q1:+.2%}, {q3:+.2%}] |", flush=True)


if __name__ == "__main__":
    main()
