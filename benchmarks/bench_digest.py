"""The cost of the weight digest on a 1 GiB checkpoint.

- write: se-inject's writer hashing the tensors as it streams them, vs the same writer with hashing switched off;
- verify: ``check_weights_digest`` (a streamed re-read and SHA-256 of the file) vs the floor of reading every
  tensor with ``safetensors.safe_open`` into torch memory (what ``load`` does anyway).

Runs are paired and interleaved; medians and ratios are printed. The file cache is warm (a checkpoint just saved or
just downloaded usually is). Usage: ``python benchmarks/bench_digest.py [--repeats N] [--gib G]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from se_inject import checkpoint


class _NoHash:
    def update(self, _data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    per_tensor = 16 << 20  # 16 Mi floats = 64 MiB
    count = max(1, round(args.gib * (1 << 30) / (per_tensor * 4)))
    tensors = {f"layer{i}.weight": torch.randn(per_tensor) for i in range(count)}
    size_gib = sum(t.numel() * 4 for t in tensors.values()) / (1 << 30)
    metadata = {"format": "pt", checkpoint.WEIGHTS_HASH_KEY: checkpoint._PLACEHOLDER}
    hasher = checkpoint._weights_hasher
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        file = Path(tmp) / "model.safetensors"

        def write(digest: bool) -> None:
            checkpoint._weights_hasher = hasher if digest else (lambda _header: _NoHash())
            try:
                checkpoint.write_safetensors_file(file, tensors, metadata)
            finally:
                checkpoint._weights_hasher = hasher

        def read_tensors() -> None:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    f.get_tensor(key).clone()  # as load does: the bytes are read

        rows = []
        plain, hashed = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: write(False)))
            hashed.append(timed(lambda: write(True)))
        rows.append(("write", statistics.median(plain), statistics.median(hashed)))
        floor, verify = [], []
        for _ in range(args.repeats):
            floor.append(timed(read_tensors))
            verify.append(timed(lambda: checkpoint.check_weights_digest(file)))
        rows.append(("verify on load", statistics.median(floor), statistics.median(verify)))
    print(f"checkpoint: {size_gib:.2f} GiB in {count} tensors; medians of {args.repeats} paired runs")
    print(f"{'step':<16}{'floor s':>9}{'digest s':>10}{'ratio':>8}")
    for name, base, extra in rows:
        print(f"{name:<16}{base:>9.3f}{extra:>10.3f}{extra / base:>8.2f}")
    print("write: floor = the writer without hashing; verify: floor = reading every tensor (load does it anyway), "
          "digest s = the extra verification pass")


if __name__ == "__main__":
    main()
