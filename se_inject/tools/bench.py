"""Latency of an injected model against its base: paired, interleaved runs, medians, no timed assertions."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..engine.tasks import example_inputs

NOISY_IQR = 0.10  # an interquartile range of the paired overheads wider than 10 points: too noisy to conclude


@dataclass(frozen=True)
class Timing:
    """Latency of base and injected model at one batch size.

    Attributes:
        base_ms, injected_ms: Median latency of each model over the rounds.
        overhead: Median over the rounds of the paired ratio ``t_injected / t_base - 1`` (each round times both
            models back to back); `overhead_q1`/`overhead_q3` are its quartiles.
    On a quiet machine the paired median agrees with the ratio of the two medians; `noisy` is set when it does not
    (the ratio of medians falls outside the paired interquartile range) or the range is wider than `NOISY_IQR`.
    """

    batch: int
    base_ms: float
    injected_ms: float
    overhead: float  # injected / base - 1
    overhead_q1: float
    overhead_q3: float
    rounds: int
    device: str
    threads: int

    @property
    def ratio_of_medians(self) -> float:
        return self.injected_ms / self.base_ms - 1 if self.base_ms else float("nan")

    @property
    def noisy(self) -> bool:
        return (self.overhead_q3 - self.overhead_q1 > NOISY_IQR
                or not self.overhead_q1 <= self.ratio_of_medians <= self.overhead_q3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio_of_medians": self.ratio_of_medians, "noisy": self.noisy}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _input_device(args: Any) -> torch.device:
    """The accelerator the arguments live on (a tensor, or tensors in lists and tuples), else the CPU."""
    if isinstance(args, torch.Tensor):
        return args.device
    if isinstance(args, (list, tuple)):
        for a in args:
            device = _input_device(a)
            if device.type != "cpu":
                return device
    return torch.device("cpu")


def _time(model: nn.Module, args: tuple[Any, ...], repeat: int) -> float:
    device = _input_device(args)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        model(*args)
    _sync(device)
    return (time.perf_counter() - start) / repeat


def interleaved(
    models: dict[str, nn.Module], x: torch.Tensor | tuple[Any, ...], *, rounds: int = 15, warmup: int = 3,
    repeat: int = 1,
) -> dict[str, list[float]]:
    """Seconds per forward of each model on `x` (one tensor, or a tuple of positional arguments: a detector's list
    of images, RAFT's two frames), `rounds` times, the order rotating every round so that drift and cache effects
    hit every model alike. Runs under inference_mode."""
    args = x if isinstance(x, tuple) else (x,)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                _time(models[name], args, 1)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(_time(models[name], args, repeat))
    return times


def overhead(times: dict[str, list[float]], model: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round overhead ``t_model / t_base - 1``."""
    ratios = [t / b - 1 for t, b in zip(times[model], times[base], strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def paired_latency(
    base: nn.Module,
    injected: nn.Module,
    input_size: tuple[int, ...],
    *,
    batch: int = 1,
    rounds: int = 15,
    warmup: int = 3,
    repeat: int = 1,
    seed: int = 0,
) -> Timing:
    """Time both models on the same input, alternating which runs first, in eval mode under inference_mode. The
    input is the task's (`tasks.example_inputs`): `batch` images of `input_size` for a detector (its transform and
    the post-processing of what it detects included), two frames for RAFT, one (N, C, T, H, W) clip for video."""
    device = _device(base)
    args = example_inputs(base, input_size, batch=batch, device=device,
                          generator=torch.Generator().manual_seed(seed))
    times = interleaved({"base": base.eval(), "injected": injected.eval()}, args, rounds=rounds, warmup=warmup,
                        repeat=repeat)
    median, q1, q3 = overhead(times, "injected", "base")
    return Timing(
        batch=batch,
        base_ms=1e3 * statistics.median(times["base"]),
        injected_ms=1e3 * statistics.median(times["injected"]),
        overhead=median,
        overhead_q1=q1,
        overhead_q3=q3,
        rounds=rounds,
        device=str(device),
        threads=torch.get_num_threads(),
    )
