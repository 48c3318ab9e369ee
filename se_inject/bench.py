"""Latency of an injected model against its base: paired, interleaved runs, medians, no timed assertions."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Timing:
    """Median latencies of both models at one batch size, and the median of the paired overheads with its
    interquartile range."""

    batch: int
    base_ms: float
    injected_ms: float
    overhead: float  # injected / base - 1
    overhead_q1: float
    overhead_q3: float
    rounds: int
    device: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(model: nn.Module, x: torch.Tensor, repeat: int) -> float:
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(repeat):
        model(x)
    _sync(x.device)
    return (time.perf_counter() - start) / repeat


def paired_latency(
    base: nn.Module,
    injected: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batch: int = 1,
    rounds: int = 15,
    warmup: int = 3,
    repeat: int = 1,
    seed: int = 0,
) -> Timing:
    """Time both models on the same input, alternating which runs first, in eval mode under inference_mode."""
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed)).to(device)
    base.eval(), injected.eval()
    base_times, injected_times, ratios = [], [], []
    with torch.inference_mode():
        for _ in range(warmup):
            _time(base, x, 1), _time(injected, x, 1)
        for r in range(rounds):
            if r % 2:
                b, i = _time(base, x, repeat), _time(injected, x, repeat)
            else:
                i, b = _time(injected, x, repeat), _time(base, x, repeat)
            base_times.append(b), injected_times.append(i), ratios.append(i / b - 1)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return Timing(
        batch=batch,
        base_ms=1e3 * statistics.median(base_times),
        injected_ms=1e3 * statistics.median(injected_times),
        overhead=statistics.median(ratios),
        overhead_q1=q1,
        overhead_q3=q3,
        rounds=rounds,
        device=str(device),
        threads=torch.get_num_threads(),
    )
