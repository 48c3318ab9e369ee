"""Survey: run the planning pipeline on the meta device over many model names and classify each.

Every model ends in one of five states: "covered" (SE at every eligible block), "partial-se" (some matching blocks
already have channel attention, others lack it by the model's design; planned with ``fill`` to count what filling
would add), "already-se" (every matching block already has channel attention), "no-match" (no block a recipe can
take, with the reason), or "error" (a crash or a timeout: a bug to fix). Nothing is allocated, so the full timm +
torchvision list runs in minutes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..api import inject
from ..engine.build import build_model
from ..engine.category import architecture_category
from ..engine.resolve import resolve_model, split_tag, timm_names, torchvision_names
from ..engine.tasks import TASKS, torchvision_task
from ..errors import NoSitesError, SEInjectError, UsageError, describe
from ..io.atomic import write_folder
from ..settings import OPTION_KEYS, Settings

STATUSES = ("covered", "partial-se", "already-se", "no-match", "error")


@dataclass(frozen=True)
class ScanRow:
    """The outcome for one model."""

    model: str
    status: str
    recipes: tuple[str, ...] = ()
    sites: int = 0
    existing: int = 0  # matching blocks skipped because they already have channel attention
    ineligible: int = 0  # matching blocks skipped for another reason (no projection, ...)
    params_delta: int | None = None
    macs_delta: int | None = None
    reason: str = ""
    seconds: float = 0.0
    category: str = ""  # for "no-match": transformer, MLP, hybrid or CNN (`category.architecture_category`)
    task: str = "classification"  # detection, segmentation, video, optical_flow, quantization (`tasks.TASKS`)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recipes": list(self.recipes)}


def model_names(patterns: Iterable[str] = ("*",), source: str | None = None) -> list[str]:
    """``source:name`` for every timm and torchvision classification model matching any fnmatch pattern."""

    if source not in (None, "timm", "torchvision"):
        raise UsageError(f"unknown source {source!r}; choose timm or torchvision")
    patterns = list(patterns) or ["*"]
    names = []
    for src, pool in (("timm", timm_names()), ("torchvision", torchvision_names())):
        if source in (None, src):
            names += [f"{src}:{n}" for n in pool if any(fnmatchcase(n, p) or fnmatchcase(f"{src}:{n}", p)
                                                        for p in patterns)]
    return names


class _Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Timeout


def scan_one(name: str, timeout: float = 0.0, **options: Any) -> ScanRow:
    """Plan and count one model on the meta device; never raises."""

    start = time.perf_counter()
    task = model_task_of(name)
    row = _scan_one(name, timeout, start, **options)
    return replace(row, task=task)


def model_task_of(name: str) -> str:
    """The task of a ``source:name`` (torchvision's by the module registering it; timm's models classify)."""
    source, _, arch = name.rpartition(":")
    return torchvision_task(split_tag(arch)[0]) if source == "torchvision" else "classification"


def _scan_one(name: str, timeout: float, start: float, **options: Any) -> ScanRow:
    use_alarm = timeout > 0 and hasattr(signal, "setitimer")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        extra = {k: v for k, v in options.items() if k != "recipe"}  # the CLI's option names
        _, report = inject(name, Settings.parse({"fill": True, **extra}, OPTION_KEYS),
                           recipes=options.get("recipe", "auto"), device="meta", seed=0)
        params_delta = report.after.params - report.before.params
        macs_delta = report.after.macs - report.before.macs
        existing = sum(s.already_attention for s in report.skipped)
        # Independent counts: numel over the inserted modules, and the flop counter's own per-module figures.
        se_params = sum(report.site_params.values())
        se_macs = sum(report.after.attention_macs.get(s.module_path, 0) for s in report.plan.sites)
        if (params_delta, macs_delta) != (se_params, se_macs):
            return ScanRow(name, "error", reason=f"count mismatch: params {params_delta} vs {se_params}, "
                           f"MACs {macs_delta} vs {se_macs}", seconds=time.perf_counter() - start)
        return ScanRow(
            model=name,
            status="partial-se" if existing else "covered",
            recipes=report.plan.recipes,
            sites=len(report.plan.sites),
            existing=existing,
            ineligible=len(report.skipped) - existing,
            params_delta=params_delta,
            macs_delta=macs_delta,
            seconds=time.perf_counter() - start,
        )
    except NoSitesError as e:
        status = "already-se" if e.reason == "already-attention" else "no-match"
        category = _category(name) if status == "no-match" else ""
        return ScanRow(name, status, reason=str(e), seconds=time.perf_counter() - start, category=category,
                       existing=e.existing)
    except _Timeout:
        return ScanRow(name, "error", reason=f"timed out after {timeout:g}s", seconds=time.perf_counter() - start)
    except SEInjectError as e:
        return ScanRow(name, "error", reason=str(e), seconds=time.perf_counter() - start)
    except Exception as e:  # a bug: reported, never fatal to the scan
        return ScanRow(name, "error", reason=describe(e, 300, kind=True), seconds=time.perf_counter() - start)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _category(name: str) -> str:

    try:
        return architecture_category(build_model(resolve_model(name), device="meta"))
    except Exception:  # the row is still a no-match; its kind is just unknown
        return ""


def summarize_categories(rows: list[ScanRow]) -> dict[str, int]:
    """The "no-match" rows by architecture category."""
    return dict(sorted(Counter(row.category or "unknown" for row in rows if row.status == "no-match").items()))


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def scan(
    names: list[str],
    *,
    workers: int = 1,
    timeout: float = 300.0,
    on_result: Callable[[ScanRow], None] | None = None,
    **options: Any,
) -> list[ScanRow]:
    """Scan `names` (``source:name``) with `workers` processes (1: in this process); results in input order."""
    results: dict[str, ScanRow] = {}

    def record(row: ScanRow) -> None:
        results[row.model] = row
        if on_result is not None:
            on_result(row)

    if workers <= 1:
        for name in names:
            record(scan_one(name, timeout, **options))
    else:
        for row in _scan_parallel(names, workers, timeout, options):
            record(row)
    return [results[n] for n in names]


def _scan_parallel(names: list[str], workers: int, timeout: float, options: dict[str, Any]) -> Iterator[ScanRow]:
    pending = list(reversed(names))
    while pending:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            running: dict[Future[ScanRow], str] = {}
            try:
                while pending or running:
                    while pending and len(running) < 2 * workers:
                        name = pending.pop()
                        running[pool.submit(scan_one, name, timeout, **options)] = name
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        name = running.pop(future)
                        yield future.result()
            except BrokenProcessPool:  # a worker died (segfault, OOM): report what it held, go on with the rest
                for future, name in running.items():
                    if future.done() and not future.exception():
                        yield future.result()
                    else:
                        yield ScanRow(name, "error", reason="the worker process died while planning this model")


def summarize_tasks(rows: list[ScanRow]) -> dict[str, dict[str, int]]:
    """`summarize` per task, in `tasks.TASKS` order."""

    return {task: summarize([r for r in rows if r.task == task]) for task in TASKS if any(r.task == task for r in rows)}


def summarize(rows: list[ScanRow]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row.status] += 1
    return {"models": len(rows), **counts}


def write_rows(rows: list[ScanRow], path: str | Path) -> None:
    """CSV or JSON by the file's extension, written atomically."""

    path = Path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps({"summary": summarize(rows), "tasks": summarize_tasks(rows),
                           "no_match": summarize_categories(rows),
                           "models": [r.to_dict() for r in rows]}, indent=2) + "\n"
    elif path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ScanRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row.to_dict(), "recipes": " ".join(row.recipes), "seconds": f"{row.seconds:.3f}"})
        text = buffer.getvalue()
    else:
        raise UsageError(f"--output {path}: use a .csv or .json file name")

    def write(target: Path) -> None:
        target.write_text(text, encoding="utf-8")

    write_folder(path.parent, {path.name: write}, force=True)
