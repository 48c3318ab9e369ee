"""The ``se-inject`` command line: thin commands over the library.

``se-inject MODEL ...`` runs the default command (``inject``); ``recipes`` and the other subcommands are named.
Heavy imports (torch, timm, torchvision) happen inside command bodies, so ``--help``, ``--version`` and
``recipes`` start fast. Data goes to stdout, messages and errors to stderr; every error is one line and an exit code
(1: the input is wrong, 2: bad usage, 3: a bug in se-inject; ``SE_INJECT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import SEInjectError, UsageError, WeightsError, describe, torch_pair_problem
from ..io.preflight import check_export_options, check_output_file, check_output_folder
from ..names import EXPORT_FORMATS, GATES, INITS, MAX_DIVISOR, MODEL_SOURCES, PLACEMENTS, VARIANTS

DEFAULT_COMMAND = "inject"
# Allowed values, shown in --help (the library validates them; tests check these lists against its own).
ATTENTION_CHOICES = tuple(VARIANTS)
GATE_CHOICES = GATES
INIT_CHOICES = INITS
PLACEMENT_CHOICES = PLACEMENTS
FORMAT_CHOICES = tuple(EXPORT_FORMATS)
SOURCE_CHOICES = MODEL_SOURCES[:2]  # registries (code needs a FILE.py:factory name)


def _choices(values: tuple[str, ...]) -> str:
    return f"[{'|'.join(values)}]"


def error(message: str) -> None:
    """One line on stderr."""
    typer.echo(f"se-inject: {message}", err=True)


class DefaultCommandGroup(TyperGroup):
    """Runs ``inject`` when the first argument is not a subcommand, and prints every usage error as one line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        own_options = {opt for param in self.get_params(ctx) for opt in param.opts}
        if args and args[0] not in self.commands and args[0] not in own_options:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        printable_streams()
        run_listing(tuple(sys.argv[1:] if args is None else args))  # skips typer's pydantic option coercion
        try:
            code = super().main(args=args, prog_name=prog_name or "se-inject", standalone_mode=False, **extra)
        except Exception as e:
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # not a click usage error
                raise
            error(f"error: {e.format_message()}")
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def printable_streams() -> None:
    """Text the terminal's encoding cannot show (PYTHONIOENCODING=ascii, a path with 'é') is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


app = typer.Typer(
    cls=DefaultCommandGroup,
    name="se-inject",
    help="Insert Squeeze-and-Excitation blocks into timm/torchvision models where the SE paper puts them.\n\n"
    "Run `se-inject MODEL` (the `inject` command) or one of the commands below.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion: typer's shell completion
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rendering it with rich would double the start-up time
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"se-inject {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    pass


@contextmanager
def error_funnel_exit() -> Iterator[None]:
    """`error_funnel` outside a typer command: exit directly."""
    try:
        with error_funnel():
            yield
    except typer.Exit as e:
        sys.exit(e.exit_code)


@contextmanager
def error_funnel() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; tracebacks only with SE_INJECT_DEBUG=1."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except SEInjectError as e:
        if os.environ.get("SE_INJECT_DEBUG"):
            raise
        error(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # the reader went away (`se-inject recipes | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as e:
        if os.environ.get("SE_INJECT_DEBUG"):
            raise
        problem = torch_pair_problem(e)
        if problem is not None:  # the environment, not se-inject
            error(f"error: {problem}")
            raise typer.Exit(problem.exit_code) from None
        error(f"internal error: {describe(e, kind=True)} (SE_INJECT_DEBUG=1 shows the traceback)")
        raise typer.Exit(3) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _console(*, stderr: bool = False) -> Any:
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


def _interactive(as_json: bool = False) -> bool:
    """Progress and status lines only for a person watching: both streams on a terminal, no --json."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def _status(message: str, *, enabled: bool) -> Iterator[Any]:
    """A rich status line on stderr (transient) while slow steps run. Yields ``update(text)``; ``update(None)``
    clears the line for good (before the results are printed)."""
    if not enabled:
        yield lambda text: None
        return
    status = _console(stderr=True).status(message)
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


# --- inject --------------------------------------------------------------------------------------------------------


@app.command(DEFAULT_COMMAND)
def inject_command(
    model: Annotated[str, typer.Argument(metavar="MODEL",
                                         help="Model name: NAME (timm first, then torchvision), timm:NAME, "
                                         "torchvision:NAME.", show_default=False)],
    reduction: Annotated[int | None, typer.Option("--reduction", "-r", metavar="R",
                                                  help="Reduction ratio r: squeeze width "
                                                   "C/r. Default: the recipe's (16; 4 for inverted residuals).",
                                                   show_default=False)] = None,
    recipe: Annotated[list[str] | None, typer.Option("--recipe", metavar="NAME",
                                                     help="Only these recipes (repeatable). Default: "
                                                     "every recipe that matches.", show_default=False)] = None,
    recipe_file: Annotated[list[Path] | None, typer.Option("--recipe-file", metavar="FILE", help="A recipe file of "
                                                           "your own (repeatable).", show_default=False)] = None,
    attention: Annotated[str, typer.Option(metavar=_choices(ATTENTION_CHOICES), help="Variant: se, eca, cbam, "
                                           "cbam-timm or ese (see the variants command).")] = "se",
    gate: Annotated[str | None, typer.Option(metavar=_choices(GATE_CHOICES), help="Gate: sigmoid or hard-sigmoid "
                                             "(default: the variant's, else sigmoid).", show_default=False)] = None,
    include: Annotated[list[str] | None, typer.Option("--include", metavar="GLOB", help="Only sites whose path "
                                                      "matches this glob, e.g. 'layer3.*' (repeatable).",
                                                      show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Skip sites whose path "
                                                      "matches this glob (repeatable).", show_default=False)] = None,
    min_channels: Annotated[int, typer.Option(metavar="N", help="Skip sites with fewer channels.")] = 0,
    fill: Annotated[bool, typer.Option("--fill", help="In a model where some matching blocks already have channel "
                                       "attention (partial SE), add SE to the blocks without it.")] = False,
    placement: Annotated[str, typer.Option(metavar=_choices(PLACEMENT_CHOICES),
                                           help="family: where a family has its own SE design (timm's SE twin, its "
                                           "paper), that design exactly; paper: the SE paper's place.")] = "family",
    divisor: Annotated[int | None, typer.Option(metavar="N",
                                                help="Round the squeeze width to a multiple of this (default 8; 1 "
                                                "gives C // r).", show_default=False)] = None,
    bias: Annotated[bool | None, typer.Option("--bias/--no-bias", help="Bias in both FC layers (default on).",
                                              show_default=False)] = None,
    init: Annotated[str, typer.Option(metavar=_choices(INIT_CHOICES), help="paper: standard init; identity: the "
                                      "model computes exactly what it did before.")] = "paper",
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="DIR", help="Output folder. Default: "
                                                "./<model>-se<r>/ (./torchvision-<model>-se<r>/ for torchvision's).",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and report on the meta device; write nothing.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    input_size: Annotated[str | None, typer.Option(metavar="N|HxW|C,H,W", help="Input size for shapes and counts; "
                                                   "video models: T,H,W or C,T,H,W. Default: the model's.",
                                                   show_default=False)] = None,
    weights: Annotated[Path | None, typer.Option(metavar="FILE", help="Local checkpoint (.safetensors, .pth, .pt) "
                                                 "loaded into the base model before surgery.",
                                                 show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(metavar="N",
                                             help="Seed of the random weights and SE init (recorded in the plan).",
                                             show_default=False)] = None,
    images: Annotated[Path | None, typer.Option(metavar="DIR", help="Folder of images for the drift report "
                                                "(default: random inputs).", show_default=False)] = None,
    export_formats: Annotated[list[str] | None, typer.Option("--export", metavar=_choices(FORMAT_CHOICES),
                                                             help="Also export: torchscript, exported (torch.export "
                                                             ".pt2), onnx (repeatable).", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One table row per site.")] = False,
    # -- pretrained weights and export shape
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Load the pretrained weights the model's tag "
                                             "names (resnet50.a1_in1k, torchvision:resnet50.IMAGENET1K_V2; no tag: "
                                             "the library's default) via timm's/torchvision's own cache.")] = False,
    static_batch: Annotated[int | None, typer.Option("--static-batch", metavar="N", help="Fix the exports' batch "
                                                     "axis to N (default: dynamic).", show_default=False)] = None,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset for --export onnx (default: the "
                                              "exporter's).", show_default=False)] = None,
) -> None:
    """Insert SE blocks into MODEL, report params/MACs before and after, save the result."""
    with error_funnel(), _status(f"planning SE for {model}", enabled=_interactive(as_json)) as status:
        formats = tuple(dict.fromkeys(export_formats or ()))
        check_choices(attention=[attention], gate=gate, init=init, reduction=reduction, divisor=divisor)
        notes = inject_preflight(dry_run=dry_run, output=output, force=force, formats=formats, weights=weights,
                                 images=images, pretrained=pretrained, static_batch=static_batch, opset=opset)
        from ..api import inject, save_injected
        from ..engine.plan import Settings

        def before_build(plan: Any, default_output: str) -> None:
            if not dry_run:
                check_output_folder(output or Path(default_output), force=force)  # before the costly build
                status(f"building {model} ({'pretrained' if pretrained else 'random'} weights) and inserting SE")

        settings = Settings(attention=attention, reduction=reduction, divisor=divisor, bias=bias, gate=gate, init=init,
                            include=tuple(include or ()), exclude=tuple(exclude or ()), min_channels=min_channels,
                            fill=fill, placement=placement)
        injected, report = inject(
            model,
            settings,
            recipe=recipe or "auto",
            recipe_files=tuple(recipe_file or ()),
            input_size=input_size,
            weights=weights,
            images=images,
            seed=seed,
            device="meta" if dry_run else "cpu",
            pretrained=pretrained,
            before_build=before_build,
        )
        if not dry_run:
            status(f"saving{' and exporting ' + ', '.join(formats) if formats else ''}")
            report = save_injected(injected, report, output or Path(report.default_output), force=force,
                                   exports=formats, export_batch=static_batch, opset=opset)
        status(None)  # done: clear the status line before the report
        if notes:
            from dataclasses import replace

            report = replace(report, notes=(*report.notes, *notes))
        if as_json:
            _print_json(report.to_dict())
        else:
            render_report(report, verbose=verbose, seed_drawn=seed is None)


def check_choices(*, attention: list[str] | tuple[str, ...] = (), gate: str | None = None, init: str = "paper",
                  reduction: int | None = None, divisor: int | None = None) -> None:
    """Option values checked against the names and ranges se-inject knows, before torch is imported (exit 2)."""
    for name, values, choices in (("attention", attention, ATTENTION_CHOICES), ("gate", [gate], GATE_CHOICES),
                                  ("init", [init], INIT_CHOICES)):
        for value in values:
            if value is not None and value not in choices:
                raise UsageError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    if reduction is not None and reduction < 1:
        raise UsageError(f"invalid reduction {reduction!r}: expected an integer >= 1")
    if divisor is not None and not 1 <= divisor <= MAX_DIVISOR:
        raise UsageError(f"invalid divisor {divisor!r}: expected an integer in [1, {MAX_DIVISOR}]")


def inject_preflight(*, dry_run: bool, output: Path | None, force: bool, formats: tuple[str, ...],
                     weights: Path | None, images: Path | None, pretrained: bool, static_batch: int | None,
                     opset: int | None) -> list[str]:
    """Everything about an inject command that can be checked before torch is imported: raises for options that
    contradict each other or cannot work, returns notes for options that will not be used."""
    check_export_options(formats, batch=static_batch, opset=opset)
    notes = []
    if dry_run:
        if formats:
            raise UsageError("--export writes files and --dry-run writes nothing: drop one of them")
        if images is not None:
            raise UsageError("--dry-run computes no outputs, so --images has nothing to measure: drop one of them")
        if output is not None or force:
            notes.append("dry run: --output/--force unused, nothing is written")
        if weights is not None:
            notes.append("dry run: the weights file was checked against the model; drift is not measured")
        if pretrained:
            notes.append("dry run: the pretrained weights were located, not loaded; drift is not measured")
    elif output is not None:
        check_output_folder(output, force=force)
    if weights is not None and not weights.is_file():
        raise WeightsError(f"{weights}: no such file" if not weights.exists() else f"{weights}: not a file")
    if images is not None:
        if not images.is_dir():
            raise SEInjectError(f"--images {images}: not a folder")
        if weights is None and not pretrained:
            notes.append("--images without --weights or --pretrained: the drift is measured against the base "
                         "model's random weights")
    return notes


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


def render_report(report: Any, *, verbose: bool = False, seed_drawn: bool = False) -> None:
    from rich.table import Table

    data = report.to_dict()
    out = _console()
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
        out.print(_export_line(e), markup=False)


def _export_line(e: dict[str, Any]) -> str:
    """``exported onnx to out/model.onnx (batch dynamic; opset 20; checked at batch 1, 3: relative error 3e-07, max
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
    return f"exported {e['format']} to {e['path']} ({'; '.join(details)})"


# --- recipes -------------------------------------------------------------------------------------------------------


@app.command("recipes")
def recipes_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the recipes as JSON.")] = False,
) -> None:
    """List the recipes: what they match, where SE goes, their default settings."""
    with error_funnel():
        print_recipes(as_json=as_json)


def print_recipes(*, as_json: bool) -> None:
    from ..engine.recipes import get_recipe, list_recipes

    recipes = [get_recipe(name) for name in list_recipes()]
    if as_json:
        _print_json([r.to_dict() for r in recipes])
        return
    for r in recipes:
        d = r.defaults
        typer.echo(f"{r.name}: {r.description}")
        bias = str(d.bias).lower()
        typer.echo(f"  defaults: reduction {d.reduction}, divisor {d.divisor}, bias {bias}, gate {d.gate}")
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
                settings = ", ".join(f"{k} {v}" for k, v in rule.se if k != "convention")
                when += f"; family design ({rule.source or 'its own'}{'; ' + settings if settings else ''})"
            for c in rule.classes:
                typer.echo(f"  {c}: {place}{when}")
        for p in r.patterns:
            scope = " ".join([*p.classes, *(f"within {w}" for w in p.within),
                              *(f"not within {w}" for w in p.not_within)])
            typer.echo(f"  pattern {p.pattern}: {scope}")


_REQUIREMENT_TEXT = {
    "pointwise": "when it is a 1x1 projection",
    "depthwise": "in blocks with a depthwise conv",
    "no-depthwise": "in blocks without a depthwise conv",
}


@app.command("export")
def export_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A folder saved by se-inject.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", metavar=_choices(FORMAT_CHOICES), help="torchscript, "
                                     "exported (torch.export .pt2) or onnx.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Output file. Default: "
                                                "DIR/model.<ext>.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    base_model: Annotated[str | None, typer.Option("--model", help="The base model, for a folder saved from your "
                                                   "own code: FILE.py:FACTORY, MODULE:FACTORY or a model name.",
                                                   show_default=False)] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the model code the folder names (only for "
                                             "folders you trust).")] = False,
    static_batch: Annotated[int | None, typer.Option("--static-batch", metavar="N", help="Fix the batch axis to N "
                                                     "(default: dynamic).", show_default=False)] = None,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset (default: the exporter's).",
                                              show_default=False)] = None,
) -> None:
    """Export a saved model to a file that loads and runs with torch alone; checks it against the eager model."""
    with error_funnel():
        check_export_options([fmt], batch=static_batch, opset=opset)
        target = output or Path(directory) / f"model{EXPORT_FORMATS[fmt]}"
        if not Path(directory).exists():
            raise SEInjectError(f"{directory}: no such file or folder (an output of se-inject MODEL)")
        check_output_file(target, force=force)
        with _status(f"exporting {directory} as {fmt}", enabled=_interactive(as_json)):
            from ..engine.memory import check_forward_memory
            from ..io.checkpoint import load, read_plan
            from ..io.export import export

            plan = read_plan(directory)
            model = load(directory, model=_base_model(base_model, plan.seed), trust_code=trust_code)
            check_forward_memory(model, plan.input_size, error=SEInjectError)
            result = export(model, plan, fmt, target, force=force, batch=static_batch, opset=opset)
        if as_json:
            _print_json(result.to_dict())
        else:
            _console().print(_export_line(result.to_dict()), markup=False)


def _base_model(name: str | None, seed: int) -> Any:
    """The model the user names on the command line (their own code runs: they named it)."""
    if name is None:
        return None
    from ..engine.models import build_model, resolve_model

    return build_model(resolve_model(name), seed=seed)


@app.command("compare")
def compare_command(
    model: Annotated[str, typer.Argument(metavar="MODEL",
                                         help="Model name (as for `se-inject MODEL`).", show_default=False)],
    attention: Annotated[list[str] | None, typer.Option("--attention", metavar=_choices(ATTENTION_CHOICES),
                                                        help="Variants to compare (repeatable; "
                                                        "default: all).", show_default=False)] = None,
    bench: Annotated[bool, typer.Option("--bench", help="Also time base vs injected on this machine.")] = False,
    rounds: Annotated[int, typer.Option(metavar="N", help="Paired timing rounds per batch size.")] = 15,
    reduction: Annotated[int | None, typer.Option("--reduction", "-r", metavar="R",
                                                  help="Reduction ratio (default: the "
                                                   "recipe's).", show_default=False)] = None,
    recipe: Annotated[list[str] | None, typer.Option("--recipe", metavar="NAME",
                                                     help="Only these recipes (repeatable).",
                                                     show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Compare attention variants on one model: sites, params, MACs, elementwise ops (and latency with --bench)."""
    with error_funnel():
        check_choices(attention=attention or (), reduction=reduction)
        import torch

        from ..names import VARIANTS
        from ..tools.compare import compare_variants

        if rounds < 1:
            raise UsageError(f"invalid rounds {rounds}: expected an integer >= 1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with _status(f"comparing variants on {model}", enabled=_interactive(as_json)) as status:
            rows = compare_variants(model, tuple(attention or VARIANTS), bench=bench, rounds=rounds, device=device,
                                    recipe=recipe or "auto", reduction=reduction, progress=status)
        if as_json:
            _print_json([r.to_dict() for r in rows])
        else:
            _render_compare(model, rows)


def _render_compare(model: str, rows: list[Any]) -> None:
    from rich.table import Table

    table = Table(title=f"attention variants on {model}", title_justify="left")
    columns = ["variant", "sites", "params +", "MACs +", "elementwise +"]
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
    out = _console()
    out.print(table)
    if batches:
        t = rows[0].latency[0]
        out.print(f"latency on {t.device}, {t.threads} threads, eval mode, inference_mode, {t.rounds} interleaved "
                  "rounds: (a) median latency of each model; (b) SE median / base median - 1; (c) median and "
                  "interquartile range of the per-round ratio SE/base - 1 (both models timed back to back)")
        noisy = [f"{r.attention} b{t.batch}" for r in rows for t in r.latency if t.noisy]
        if noisy:
            error(f"warning: too noisy to conclude for {', '.join(noisy)} (marked !): the paired interquartile "
                      "range is wider than 10 points or excludes (b); rerun on a quiet machine or with more --rounds")


@app.command("scan")
def scan_command(
    patterns: Annotated[list[str] | None, typer.Argument(metavar="[PATTERN]...",
                                                         help="fnmatch patterns over model names (default: all).",
                                                         show_default=False)] = None,
    source: Annotated[str | None, typer.Option(metavar=_choices(SOURCE_CHOICES), help="Only timm or only "
                                               "torchvision.", show_default=False)] = None,
    reduction: Annotated[int | None, typer.Option("--reduction", "-r", metavar="R",
                                                  help="Reduction ratio (default: each "
                                                   "recipe's).", show_default=False)] = None,
    recipe: Annotated[list[str] | None, typer.Option("--recipe", metavar="NAME",
                                                     help="Only these recipes (repeatable).",
                                                     show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every model's row as JSON.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE",
                                                help="Write the rows to a .csv or .json file.",
                                                show_default=False)] = None,
    workers: Annotated[int, typer.Option(metavar="N", help="Worker processes (default: the CPU count).")] = 0,
    timeout: Annotated[float, typer.Option(metavar="SECONDS",
                                           help="Seconds one model may take before it counts as an error.")]
    = 300.0,
) -> None:
    """Plan SE for every model matching the patterns (on the meta device) and summarize the coverage."""
    with error_funnel():
        from ..api import validate_settings
        from ..engine.plan import Settings
        from ..tools.scan import model_names, summarize, summarize_categories, summarize_tasks, write_rows

        validate_settings(Settings(reduction=reduction))
        names = model_names(patterns or ["*"], source)
        if not names:
            raise SEInjectError(f"no model name matches {' '.join(patterns or ['*'])}")
        options: dict[str, Any] = {"recipe": recipe or "auto", "reduction": reduction}
        rows = _scan_with_progress(names, workers or os.cpu_count() or 1, timeout, options,
                                   show=_interactive(as_json))
        if output is not None:
            write_rows(rows, output)
        if as_json:
            _print_json({"summary": summarize(rows), "tasks": summarize_tasks(rows),
                         "no_match": summarize_categories(rows),
                         "models": [r.to_dict() for r in rows]})
        else:
            _render_scan(rows, output)


def _scan_with_progress(names: list[str], workers: int, timeout: float, options: dict[str, Any], *,
                        show: bool = True) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..tools.scan import scan

    with Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=_console(stderr=True), transient=True,
                  disable=not show) as progress:
        task = progress.add_task("scan", total=len(names), last="")
        return scan(names, workers=min(workers, len(names)), timeout=timeout,
                    on_result=lambda row: progress.update(task, advance=1, last=row.model), **options)


SCAN_TABLE_ROWS = 50  # more models than this: the summary only


def _render_scan(rows: list[Any], output: Path | None) -> None:
    from rich.table import Table

    from ..tools.scan import summarize, summarize_categories, summarize_tasks

    out = _console()
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


@app.command("variants")
def variants_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the variants as JSON.")] = False,
) -> None:
    """List the attention variants (--attention) and their defaults."""
    with error_funnel():
        print_variants(as_json=as_json)


def print_variants(*, as_json: bool) -> None:
    from ..names import VARIANTS

    if as_json:
        _print_json([v.to_dict() for v in VARIANTS.values()])
        return
    for v in VARIANTS.values():
        typer.echo(f"{v.name}: {v.description}")
        uses = "uses --reduction/--divisor" if v.uses_reduction else "no reduction"
        typer.echo(f"  gate {v.gate or 'sigmoid (the recipe default)'}; {uses}; params per site: {v.params}")
        typer.echo(f"  {v.reference}")


def run_listing(argv: tuple[str, ...]) -> None:
    """`recipes`/`variants` [--json] without typer's machinery (its command tree and pydantic-based option coercion
    cost more than the listing); returns for anything else."""
    if argv in _FAST:
        with error_funnel_exit():
            _FAST[argv](as_json=argv[-1] == "--json")
        sys.exit(0)


def main() -> None:
    code: Any = 0
    try:
        printable_streams()
        run_listing(tuple(sys.argv[1:]))  # before typer builds its command tree
        app()
    except BrokenPipeError:  # a closed pipe outside the commands' error funnel (help, usage errors): exit as they do
        code = 141
    except SystemExit as e:
        code = e.code
    exit_now(code)


def exit_now(code: Any) -> NoReturn:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown of every imported module: once
    torch and timm are imported that teardown takes about a second, longer than the work of many commands.

    The exit itself is normal (`sys.exit`): the interpreter waits for non-daemon threads and runs the exit handlers.
    The last handler to run is `_end_process`, registered when this module is imported (handlers run in reverse
    order of registration, so every one registered after it, torch's and timm's included, has run); it flushes the
    streams and ends the process with the status before the teardown starts."""
    global _exit_status
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    _exit_status = 0 if code is None else code if isinstance(code, int) else 1
    sys.exit(_exit_status)


_exit_status: int | None = None  # set by `exit_now`: the status `_end_process` ends the process with


def _end_process() -> None:
    """The last exit handler: flush the streams and end the process with `exit_now`'s status, skipping the module
    teardown. Does nothing where `exit_now` was not called (the module imported as a library, in tests)."""
    if _exit_status is None:
        return
    code = _exit_status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader is gone: the shell's code for SIGPIPE, as the commands exit
            code = 141
        except (OSError, ValueError):
            pass
    os._exit(code)


atexit.register(_end_process)


_FAST = {
    ("recipes",): print_recipes,
    ("recipes", "--json"): print_recipes,
    ("variants",): print_variants,
    ("variants", "--json"): print_variants,
}

if __name__ == "__main__":
    main()
