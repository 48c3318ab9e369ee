"""Planning cost grows with the number of modules, not parameters: `--dry-run` on the largest CNNs, and the peak
memory of saving a real checkpoint of a large model (streamed: at most one copy of the weights in memory).

Each command runs in a fresh process that reports its own peak RSS; the floor is a process that only imports
torch, timm and se-inject. Usage: ``python benchmarks/bench_planning.py``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import resource, sys, time
start = time.perf_counter()
code = 0
try:
    if sys.argv[1:]:
        from se_inject.cli.commands import app
        app(sys.argv[1:])
    else:
        import timm, se_inject.api  # the floor: imports only
except SystemExit as e:
    code = e.code or 0
print(f"{time.perf_counter() - start:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {code}",
      file=sys.stderr)
"""

DRY_RUN = ["regnety_1280", "resnet200d", "efficientnet_l2", "resnetv2_152x4_bit", "regnetx_320", "resnext101_64x4d"]
SAVE = ["wide_resnet101_2", "resnetv2_152x2_bit"]


def measure(args: list[str]) -> tuple[float, float, int, str]:
    result = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
    seconds, rss_mb, code = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), float(rss_mb), int(code), result.stdout


def main() -> None:
    floor_s, floor_mb, _, _ = measure([])
    print(f"floor (import torch, timm, se_inject): {floor_s:.2f} s, peak RSS {floor_mb:.0f} MB\n")
    print(f"{'--dry-run':22} {'params':>12} {'modules':>8} {'sites':>6} {'total s':>8} {'plan s':>7} "
          f"{'peak RSS MB':>12}  result")
    for name in DRY_RUN:
        seconds, rss, code, out = measure([name, "--dry-run", "--json"])
        if code == 0:
            data = json.loads(out)
            params, sites, result = f"{data['params']['before']:,}", str(len(data["sites"])), "planned"
        else:
            params, sites, result = "", "0", "exit 1 (already has SE in every block)"
        import timm
        import torch

        with torch.device("meta"):
            modules = sum(1 for _ in timm.create_model(name).modules())
        print(f"{name:22} {params:>12} {modules:8d} {sites:>6} {seconds:8.2f} {seconds - floor_s:7.2f} "
              f"{rss:12.0f}  {result}")
    print(f"\n{'save (real weights)':22} {'weights MB':>11} {'total s':>8} {'peak RSS MB':>12} {'RSS - floor':>12}"
          f" {'/ weights':>9}")
    for name in SAVE:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, rss, code, _ = measure([name, "-o", str(Path(tmp) / "out"), "--seed", "0"])
            size = (Path(tmp) / "out" / "model.safetensors").stat().st_size / 2**20 if code == 0 else float("nan")
        print(f"{name:22} {size:11.0f} {seconds:8.2f} {rss:12.0f} {rss - floor_mb:12.0f} "
              f"{(rss - floor_mb) / size:9.2f}")


if __name__ == "__main__":
    main()
