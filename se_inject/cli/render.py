"""Rendering for the command line: reports, tables and listings on a rich console (data on stdout, progress and
messages on stderr). Imports rich, never torch."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from .process import error, error_funnel_exit


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def console(*, stderr: bool = False) -> Any:
    """A rich console for data (stdout) or messages (stderr). On a terminal rich wraps at word boundaries to its
    width; piped, no line is wrapped or cut (a copy-paste line stays one line) and tables take $COLUMNS if set. A
    closed pipe raises BrokenPipeError, which `error_funnel` turns into exit 141 (rich's own handler would exit 1)."""
    from rich.console import Console

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    terminal = (sys.stderr if stderr else sys.stdout).isatty()
    columns = os.environ.get("COLUMNS", "")
    width = None if terminal else int(columns) if columns.isdigit() and int(columns) >= 40 else 1000
    return PipeAwareConsole(stderr=stderr, highlight=False, soft_wrap=not terminal, width=width)


def interactive(as_json: bool = False) -> bool:
    """Progress and status lines only for a person watching: both streams on a terminal, no --json."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def status_line(message: str, *, enabled: bool) -> Iterator[Any]:
    """A rich status line on stderr (transient) while slow steps run. Yields ``update(text)``; ``update(None)``
    clears the line for good (before the results are printed)."""
    if not enabled:
        yield lambda text: None
        return
    status = console(stderr=True).status(message)
    status.start()

    def update(text: str | None) -> None:
        if text is None:
            status.stop()
        else:
            status.update(text)

    try:
        yield update
    finally:
        status.stop()


def _pct(delta: int, before: int) -> str:
    return f"{100 * delta / before:+.2f}%" if before else "n/a"


def _num(n: int) -> str:
    return f"{n:,}"


def _stages(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive sites of one recipe at one feature-map size: a network stage."""
    stages: list[list[dict[str, Any]]] = []
    for row in rows:
        key = (row["recipe"], tuple(row["feature_map"][1:]))
        if stages and (stages[-1][0]["recipe"], tuple(stages[-1][0]["feature_map"][1:])) == key:
            stages[-1].append(row)
        else:
            stages.append([row])
    return stages


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _label(paths: list[str]) -> str:
    """``layer1.0 .. layer1.2`` -> ``layer1.0-2``."""
    first, last = paths[0], paths[-1]
    if first == last:
        return first
    head, _, tail = first.rpartition(".")
    head2, _, tail2 = last.rpartition(".")
    return f"{head}.{tail}-{tail2}" if head == head2 and head else f"{first} .. {last}"


def site_place(row: dict[str, Any]) -> str:
    """Where inside its block a site's SE went, in words: "after bn3", "after bn3, in its se slot"."""
    place = f"{row['position']} {row['anchor'] or 'the block output'}"
    return f"{place}, in its {row['slot']} slot" if row["slot"] else place


def render_report(report: Any, *, verbose: bool = False, seed_drawn: bool = False) -> None:
    from rich.table import Table

    data = report.to_dict()
    out = console()
    recipes = {row["recipe"] for row in data["sites"]}
    table = Table(title=f"SE in {data['model']} at {'x'.join(map(str, data['input_size']))}", title_justify="left")
    if out.width < 100:  # a narrow terminal (or a pipe at 80 columns): no rules, one space between columns
        table.box, table.collapse_padding, table.pad_edge = None, True, False
    columns = ["site" if verbose else "stage", "n", "C", "C/r", "map", "params +", "MACs +", "elementwise +"]
    if len(recipes) > 1:
        columns.insert(1, "recipe")
    for name in columns:
        table.add_column(name, justify="left" if name in ("site", "stage", "recipe") else "right", no_wrap=True)
    groups = [[row] for row in data["sites"]] if verbose else _stages(data["sites"])
    for group in groups:
        cells = [
            _label([r["path"] for r in group]),
            str(len(group)),
            _span([r["channels"] for r in group]),
            _span([r["squeeze_channels"] for r in group]),
            "x".join(map(str, group[0]["feature_map"][1:])),
            _num(sum(r["params"] for r in group)),
            _num(sum(r["macs"] for r in group)),
            _num(sum(r["elementwise_ops"] for r in group)),
        ]
        if len(recipes) > 1:
            cells.insert(1, group[0]["recipe"])
        table.add_row(*cells)
    out.print(table)
    totals = Table(show_header=True, box=None, padding=(0, 2))
    for name in ("", "before", "after", "delta", ""):
        totals.add_column(name, justify="right" if name else "left")
    for key, label in (("params", "params"), ("macs", "MACs")):
        d = data[key]
        totals.add_row(label, _num(d["before"]), _num(d["after"]), f"{d['delta']:+,}", _pct(d["delta"], d["before"]))
    out.print(totals)
    out.print(
        f"{len(data['sites'])} SE blocks ({', '.join(sorted(recipes))}); "
        f"SE elementwise ops (pool, gate, scale): {_num(data['se_elementwise_ops'])}"
    )
    places = Counter(site_place(row) for row in data["sites"])
    out.print("where in each block: " + ", ".join(f"{place} ({n} blocks)" for place, n in places.items()), markup=False)
    family = Counter(row["source"] for row in data["sites"] if row["placement"] == "family")
    if family:
        paper = sum(row["placement"] == "paper" for row in data["sites"])
        out.print("SE design: " + ", ".join(f"{n} family ({source or 'its own'})" for source, n in family.items())
                  + (f", {paper} SE paper" if paper else ""), markup=False)
    if data["already_attention"]:
        paths = data["already_attention"]
        out.print(f"{len(paths)} blocks already had channel attention (kept as they are): "
                  f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}", markup=False)
    if data["pretrained"]:
        out.print(f"base weights: pretrained {data['pretrained']}", markup=False)
    out.print(f"seed {data['seed']}" + (f" (drawn: --seed {data['seed']} repeats this run)" if seed_drawn else ""))
    if data["skipped"]:
        reasons: dict[str, int] = {}
        for s in data["skipped"]:
            if s["path"] not in data["already_attention"]:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        for reason, n in reasons.items():
            out.print(f"skipped {n} blocks: {reason}", markup=False)
    if data["drift"]:
        d = data["drift"]
        top1 = f", top-1 agreement {100 * d['top1_agreement']:.1f}%" if d["top1_agreement"] is not None else ""
        out.print(f"drift from the base model on {d['inputs']}: relative L2 {d['relative_l2']:.3g}{top1}")
    for note in data["notes"]:
        out.print(f"note: {note}")
    out.print(f"saved to {data['output']}" if data["output"] else "dry run: nothing written")
    if data["timm_architecture"]:
        out.print(f"plain timm loads it: timm.create_model(\"local-dir:{data['output']}\", pretrained=True) "
                  f"is {data['timm_architecture']}", markup=False)
    for e in data["exports"]:
        out.print(export_line(e), markup=False)


def export_line(e: dict[str, Any]) -> str:
    """``exported ONNX to out/model.onnx (batch dynamic; opset 20; checked at batch 1, 3: relative error 3e-07, max
    |diff| 1.2e-05)``: the verdict is on the relative error."""
    details = [f"batch {e['batch']}"]
    if e.get("opset") is not None:
        details.append(f"opset {e['opset']}")
    if e["max_abs_diff"] is None:
        details.append("not run back")
    else:
        batches = ", ".join(map(str, e["checked_batches"]))
        details.append(f"checked at batch {batches}: relative error {e['relative_diff']:.2g}, "
                       f"max |diff| {e['max_abs_diff']:.3g}")
    if e["note"]:
        details.append(e["note"])
    kind = {"torchscript": "TorchScript", "exported": "torch.export", "onnx": "ONNX"}.get(e["format"], e["format"])
    return f"exported {kind} to {e['path']} ({'; '.join(details)})"


def print_recipes(*, as_json: bool) -> None:
    from ..engine.recipe_files import get_recipe, list_recipes
    from ..engine.recipes import recipe_table

    recipes = [get_recipe(name) for name in list_recipes()]
    if as_json:
        print_json([r.to_dict() for r in recipes])
        return
    for r in recipes:
        d = r.defaults
        typer.echo(f"{r.name}: {r.description}")
        bias = str(d.bias).lower()
        typer.echo(f"  defaults: reduction {d.reduction}, divisor {d.rd_divisor}, bias {bias}, gate {d.gate_layer}")
        if d.convention:
            typer.echo(f"  squeeze width: {d.convention}")
        for c in r.conventions:
            typer.echo(f"  in {', '.join(c.models)}: {c.defaults.convention}")
        for rule in r.blocks:
            place = f"{rule.position} {rule.anchor}" + (f" (fills `{rule.slot}`)" if rule.slot else "")
            place += f" (in {rule.anchor}'s own forward)" if rule.in_child else ""
            place += f", times the block's gain {rule.slot_gain:g}" if rule.slot_gain != 1.0 else ""
            when = "".join(f", where {attr} = {value!r}" for attr, value in rule.when)
            when += "".join(f", {_REQUIREMENT_TEXT.get(req, 'requires ' + req)}" for req in rule.require)
            when += "".join([*(f", within {g}" for g in rule.within), *(f", not within {g}" for g in rule.not_within)])
            if rule.placement == "family":
                settings = ", ".join(f"{k} {v}" for k, v in sorted(recipe_table(rule.se).items())
                                     if k != "convention")
                when += f"; family design ({rule.source or 'its own'}{'; ' + settings if settings else ''})"
            for c in rule.classes:
                typer.echo(f"  {c}: {place}{when}")
        for p in r.patterns:
            scope = " ".join([*p.classes, *(f"within {w}" for w in p.within),
                              *(f"not within {w}" for w in p.not_within), *(f"at {g}" for g in p.paths)])
            typer.echo(f"  pattern {p.pattern}: {scope}")


_REQUIREMENT_TEXT = {
    "pointwise": "when it is a 1x1 projection",
    "depthwise": "in blocks with a depthwise conv",
    "no-depthwise": "in blocks without a depthwise conv",
}


def render_compare(model: str, rows: list[Any]) -> None:
    from rich.table import Table

    table = Table(title=f"attention variants on {model}", title_justify="left")
    columns = ["variant", "sites", "params +", "MACs +", "elementwise +"]
    skipped = [r for r in rows if r.skipped]
    rows = [r for r in rows if not r.skipped]
    batches = [t.batch for t in rows[0].latency] if rows and rows[0].latency else []
    for b in batches:  # (a) medians of each model, (b) their ratio, (c) the median of the paired ratios
        columns += [f"b{b} base ms (a)", f"b{b} SE ms (a)", f"b{b} SE/base (b)", f"b{b} paired (c) [IQR]"]
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
    for r in rows:
        cells = [r.attention, str(r.sites), f"{_num(r.params_delta)} ({_pct(r.params_delta, r.params_before)})",
                 f"{_num(r.macs_delta)} ({_pct(r.macs_delta, r.macs_before)})", _num(r.elementwise_ops)]
        for t in r.latency:
            cells += [f"{t.base_ms:.1f}", f"{t.injected_ms:.1f}", f"{100 * t.ratio_of_medians:+.1f}%",
                      f"{100 * t.overhead:+.1f}% [{100 * t.overhead_q1:+.1f}, {100 * t.overhead_q3:+.1f}]"
                      + (" !" if t.noisy else "")]
        table.add_row(*cells)
    out = console()
    out.print(table)
    for r in skipped:
        out.print(f"{r.attention}: left out: {r.skipped}")
    if batches:
        t = rows[0].latency[0]
        out.print(f"latency on {t.device}, {t.threads} threads, eval mode, inference_mode, {t.rounds} interleaved "
                  "rounds: (a) median latency of each model; (b) SE median / base median - 1; (c) median and "
                  "interquartile range of the per-round ratio SE/base - 1 (both models timed back to back)")
        noisy = [f"{r.attention} b{t.batch}" for r in rows for t in r.latency if t.noisy]
        if noisy:
            error(f"warning: too noisy to conclude for {', '.join(noisy)} (marked !): the paired interquartile "
                      "range is wider than 10 points or excludes (b); rerun on a quiet machine or with more --rounds")


SCAN_TABLE_ROWS = 50  # more models than this: the summary only


def render_scan(rows: list[Any], output: Path | None) -> None:
    from rich.table import Table

    from ..tools.scan import summarize, summarize_categories, summarize_tasks

    out = console()
    if len(rows) <= SCAN_TABLE_ROWS:
        table = Table(title="SE coverage", title_justify="left")
        for name in ("model", "task", "status", "recipes", "sites", "existing SE", "params +", "MACs +", "reason"):
            table.add_column(name, justify="right" if name in ("sites", "existing SE", "params +", "MACs +")
                             else "left", overflow="fold")
        for r in rows:
            table.add_row(r.model, r.task, r.status, " ".join(r.recipes), str(r.sites), str(r.existing),
                          _num(r.params_delta) if r.params_delta is not None else "",
                          _num(r.macs_delta) if r.macs_delta is not None else "", r.reason.split(":")[0])
        out.print(table)
    summary = summarize(rows)
    table = Table(title="summary", title_justify="left")
    for name in ("models", "covered", "partial SE", "already SE", "no match", "errors"):
        table.add_column(name, justify="right")
    table.add_row(*(str(summary[k]) for k in ("models", "covered", "partial-se", "already-se", "no-match", "error")))
    out.print(table)
    tasks = summarize_tasks(rows)
    if set(tasks) - {"classification"}:
        table = Table(title="by task", title_justify="left")
        for name in ("task", "models", "covered", "partial SE", "already SE", "no match", "errors"):
            table.add_column(name, justify="left" if name == "task" else "right")
        for task, counts in tasks.items():
            table.add_row(task, *(str(counts[k]) for k in ("models", "covered", "partial-se", "already-se",
                                                           "no-match", "error")))
        out.print(table)
    kinds = summarize_categories(rows)
    if kinds:
        out.print("no match by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.items()), markup=False)
    errors = [r for r in rows if r.status == "error"]
    for r in errors[:20]:
        out.print(f"error: {r.model}: {r.reason}", markup=False)
    if output is not None:
        out.print(f"rows written to {output}")
    elif len(rows) > SCAN_TABLE_ROWS:
        out.print(f"{len(rows)} models: the table shows up to {SCAN_TABLE_ROWS}; see them all with --output "
                  "FILE.csv (or .json), or --json")


def print_variants(*, as_json: bool) -> None:
    from ..names import VARIANTS
    from ..settings import VARIANT_SETTINGS, SESettings

    def own(name: str) -> dict[str, Any]:  # the variant's own settings, in the CLI's words
        s = VARIANT_SETTINGS.get(name, SESettings())
        return {"gate": s.gate_layer, "divisor": s.rd_divisor, "rounding": s.rd_round, "bias": s.bias}

    if as_json:
        print_json([{**v.to_dict(), **own(v.name)} for v in VARIANTS.values()])
        return
    for v in VARIANTS.values():
        typer.echo(f"{v.name}: {v.description}")
        uses = "uses --reduction/--divisor" if v.uses_reduction else "no reduction"
        gate = own(v.name)["gate"] or "sigmoid (the recipe default)"
        typer.echo(f"  gate {gate}; {uses}; params per site: {v.params}")
        typer.echo(f"  {v.reference}")


def run_listing(argv: tuple[str, ...]) -> None:
    """`recipes`/`variants` [--json] without typer's machinery (its command tree and pydantic-based option coercion
    cost more than the listing); returns for anything else."""
    if argv in _FAST:
        with error_funnel_exit():
            _FAST[argv](as_json=argv[-1] == "--json")
        sys.exit(0)


_FAST = {
    ("recipes",): print_recipes,
    ("recipes", "--json"): print_recipes,
    ("variants",): print_variants,
    ("variants", "--json"): print_variants,
}
