"""The ``se-inject`` command line: thin commands over the library.

``se-inject MODEL ...`` runs the default command (``inject``); ``recipes`` and the other subcommands are named.
Heavy imports (torch, timm, torchvision) happen inside command bodies, so ``--help``, ``--version`` and
``recipes`` start fast. Data goes to stdout, messages and errors to stderr; every error is one line and an exit code
(1: the input is wrong, 2: bad usage, 3: a bug in se-inject; ``SE_INJECT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import SEInjectError, UsageError
from ..io.preflight import check_export_options, check_output_file, check_output_folder
from ..names import EXPORT_FORMATS, GATES, INITS, MODEL_SOURCES, PLACEMENTS, VARIANTS
from ..settings import OPTION_KEYS, Settings
from .preflight import inject_preflight
from .process import error, error_funnel, exit_now, printable_streams
from .render import (
    console,
    export_line,
    interactive,
    print_json,
    print_recipes,
    print_variants,
    render_compare,
    render_report,
    render_scan,
    run_listing,
    status_line,
)

DEFAULT_COMMAND = "inject"
# Allowed values, shown in --help (`se_inject.settings` checks them).
ATTENTION_CHOICES = tuple(VARIANTS)
GATE_CHOICES = GATES
INIT_CHOICES = INITS
PLACEMENT_CHOICES = PLACEMENTS
FORMAT_CHOICES = tuple(EXPORT_FORMATS)
SOURCE_CHOICES = MODEL_SOURCES[:2]  # registries (code needs a FILE.py:factory name)


def _choices(values: tuple[str, ...]) -> str:
    return f"[{'|'.join(values)}]"


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


app = typer.Typer(
    cls=DefaultCommandGroup,
    name="se-inject",
    help="Insert Squeeze-and-Excitation blocks into timm/torchvision models where the SE paper puts them.\n\n"
    "Run `se-inject MODEL` (the `inject` command) or one of the commands below. MODEL is a timm or torchvision "
    "name, or your own code: FILE.py:factory or package.module:factory.",
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


# --- inject --------------------------------------------------------------------------------------------------------


@app.command(DEFAULT_COMMAND)
def inject_command(
    model: Annotated[str, typer.Argument(metavar="MODEL",
                                         help="Model name: NAME (timm first, then torchvision), timm:NAME, "
                                         "torchvision:NAME; or your own code: FILE.py:factory, "
                                         "package.module:factory.", show_default=False)],
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
    with error_funnel(), status_line(f"planning SE for {model}", enabled=interactive(as_json)) as status:
        formats = tuple(dict.fromkeys(export_formats or ()))
        settings = Settings.parse({"attention": attention, "reduction": reduction, "divisor": divisor, "bias": bias,
                                   "gate": gate, "init": init, "include": include or (), "exclude": exclude or (),
                                   "min-channels": min_channels, "fill": fill, "placement": placement}, OPTION_KEYS)
        notes = inject_preflight(dry_run=dry_run, output=output, force=force, formats=formats, weights=weights,
                                 images=images, pretrained=pretrained, static_batch=static_batch, opset=opset)
        from ..api import inject, save

        def before_build(plan: Any, default_output: str) -> None:
            if not dry_run:
                check_output_folder(output or Path(default_output), force=force)  # before the costly build
                status(f"building {model} ({'pretrained' if pretrained else 'random'} weights) and inserting SE")

        injected, report = inject(model, settings, recipes=[*(recipe or ["auto"]), *(recipe_file or ())],
                                  input_size=input_size, weights=weights, pretrained=pretrained, seed=seed,
                                  device="meta" if dry_run else "cpu", drift=images, before_build=before_build)
        if not dry_run:
            status(f"saving{' and exporting ' + ', '.join(formats) if formats else ''}")
            report = save(injected, report, output or Path(report.default_output), force=force, exports=formats,
                          export_batch=static_batch, opset=opset)
        status(None)  # done: clear the status line before the report
        if notes:
            from dataclasses import replace

            report = replace(report, notes=(*report.notes, *notes))
        if as_json:
            print_json(report.to_dict())
        else:
            render_report(report, verbose=verbose, seed_drawn=seed is None)


# --- recipes -------------------------------------------------------------------------------------------------------


@app.command("recipes")
def recipes_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the recipes as JSON.")] = False,
) -> None:
    """List the recipes: what they match, where SE goes, their default settings."""
    with error_funnel():
        print_recipes(as_json=as_json)


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
        with status_line(f"exporting {directory} as {fmt}", enabled=interactive(as_json)):
            from ..engine.memory import check_forward_memory
            from ..io.checkpoint import load, read_plan
            from ..io.export import export

            plan = read_plan(directory)
            model = load(directory, model=_base_model(base_model, plan.seed), trust_code=trust_code)
            check_forward_memory(model, plan.input_size, error=SEInjectError)
            result = export(model, plan, fmt, target, force=force, batch=static_batch, opset=opset)
        if as_json:
            print_json(result.to_dict())
        else:
            console().print(export_line(result.to_dict()), markup=False)


def _base_model(name: str | None, seed: int) -> Any:
    """The model the user names on the command line (their own code runs: they named it)."""
    if name is None:
        return None
    from ..engine.build import build_model
    from ..engine.resolve import resolve_model

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
    input_size: Annotated[str | None, typer.Option("--input-size", metavar="SIZE",
                                                   help="Input size, as for `se-inject MODEL`.",
                                                   show_default=False)] = None,
    fill: Annotated[bool, typer.Option("--fill", help="Partial-SE models: fill the blocks without SE.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Compare attention variants on one model: sites, params, MACs, elementwise ops (and latency with --bench)."""
    with error_funnel():
        for kind in attention or [None]:  # checked before torch is imported
            Settings.parse({"attention": kind, "reduction": reduction}, OPTION_KEYS)
        import torch

        from ..tools.compare import compare_variants

        if rounds < 1:
            raise UsageError(f"invalid rounds {rounds}: expected an integer >= 1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with status_line(f"comparing variants on {model}", enabled=interactive(as_json)) as status:
            rows = compare_variants(model, tuple(attention) if attention else None, bench=bench, rounds=rounds,
                                    device=device, recipe=recipe or "auto", reduction=reduction,
                                    input_size=input_size, fill=fill, progress=status)
        if as_json:
            print_json([r.to_dict() for r in rows])
        else:
            render_compare(model, rows)


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
        from ..tools.scan import model_names, summarize, summarize_categories, summarize_tasks, write_rows

        Settings.parse({"reduction": reduction}, OPTION_KEYS)  # checked before the workers start
        names = model_names(patterns or ["*"], source)
        if not names:
            raise SEInjectError(f"no model name matches {' '.join(patterns or ['*'])}")
        options: dict[str, Any] = {"recipe": recipe or "auto", "reduction": reduction}
        rows = _scan_with_progress(names, workers or os.cpu_count() or 1, timeout, options,
                                   show=interactive(as_json))
        if output is not None:
            write_rows(rows, output)
        if as_json:
            print_json({"summary": summarize(rows), "tasks": summarize_tasks(rows),
                         "no_match": summarize_categories(rows),
                         "models": [r.to_dict() for r in rows]})
        else:
            render_scan(rows, output)


def _scan_with_progress(names: list[str], workers: int, timeout: float, options: dict[str, Any], *,
                        show: bool = True) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..tools.scan import scan

    with Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=console(stderr=True), transient=True,
                  disable=not show) as progress:
        task = progress.add_task("scan", total=len(names), last="")
        return scan(names, workers=min(workers, len(names)), timeout=timeout,
                    on_result=lambda row: progress.update(task, advance=1, last=row.model), **options)


@app.command("variants")
def variants_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the variants as JSON.")] = False,
) -> None:
    """List the attention variants (--attention) and their defaults."""
    with error_funnel():
        print_variants(as_json=as_json)


def main() -> None:
    """The `se-inject` entry point (see `se_inject.cli.main`, which answers the listings before importing this)."""
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



if __name__ == "__main__":
    main()
