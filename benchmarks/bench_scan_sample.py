"""Planning and counting cost of two checkouts on the same sample of models, in one run.

    python benchmarks/bench_scan_sample.py --against /path/to/other/checkout [--rounds 2]

Each round runs the sample once per checkout, alternating (this checkout, the other, this, ...), each in a fresh
process that imports that checkout's se_inject and scans the sample in-process with `scan_one` (the meta device:
find, plan, verify, apply, count). Prints the seconds of each run, the medians and their ratio (this / other), and
whether the two checkouts agree on every row's status, sites and counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SAMPLE = ["timm:resnet50", "timm:efficientnet_b0", "timm:convnext_tiny", "timm:regnety_016", "timm:densenet121",
          "timm:mobilenetv3_large_100", "timm:xception41", "timm:inception_v3", "torchvision:efficientnet_b0",
          "torchvision:convnext_tiny", "torchvision:swin_t", "timm:hrnet_w18", "timm:dla34", "timm:cspresnet50",
          "timm:vovnet39a", "timm:nfnet_f0"]

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(2)
from se_inject.tools.scan import scan_one
scan_one("timm:test_resnet")  # imports and first-call costs out of the timing
start = time.perf_counter()
rows = [scan_one(name) for name in sys.argv[1:]]
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rows": [[r.model, r.status, r.sites, r.params_delta, r.macs_delta] for r in rows]}))
"""


def run(checkout: Path, names: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, *names], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout (its root folder)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    times: dict[str, list[float]] = {"this": [], "other": []}
    rows: dict[str, list] = {}
    for _ in range(args.rounds):
        for label, checkout in (("this", here), ("other", args.against.resolve())):
            result = run(checkout, SAMPLE)
            times[label].append(result["seconds"])
            rows[label] = result["rows"]
            print(f"{label}: {result['seconds']:.2f} s", flush=True)
    this, other = statistics.median(times["this"]), statistics.median(times["other"])
    print(f"median this {this:.2f} s, other {other:.2f} s, ratio this/other {this / other:.2f}")
    differ = [(a, b) for a, b in zip(rows["this"], rows["other"], strict=True) if a != b]
    print("rows agree" if not differ else f"rows differ: {differ}")


if __name__ == "__main__":
    main()
