"""The command line: default command, JSON report, exit codes, one-line errors, fast start without torch."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from se_inject.cli.commands import app
from se_inject.errors import UsageError
from se_inject.settings import Settings

runner = CliRunner()
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str):
    return runner.invoke(app, list(args), env=WIDE)


def test_model_name_without_subcommand(tmp_path):
    out = tmp_path / "o"
    result = run("timm:test_resnet", "--reduction", "16", "-o", str(out), "--seed", "0")
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    assert (out / "report.json").is_file()
    assert "layer1.0" in result.stdout
    assert "saved to" in result.stdout


@pytest.mark.parametrize(("model", "slot"), [("timm:test_resnet", "se"), ("torchvision:resnet18", None)])
def test_the_report_says_where_inside_each_block_the_se_went(tmp_path, model, slot):
    """SE-ResNet's place is the residual branch's last norm: bn2 in a BasicBlock, bn3 in a Bottleneck. timm's blocks
    call their `se` slot there; torchvision's have no slot, so the forward is rewritten to call the SE after it. Both
    are named in report.json and in the printed report."""
    from se_inject.engine.build import build_model
    from se_inject.engine.resolve import resolve_model

    base = build_model(resolve_model(model), device="meta")
    result = run(model, "--dry-run", "--json", "--seed", "0", "--input-size", "64")
    assert result.exit_code == 0, result.stderr
    sites = json.loads(result.stdout)["sites"]
    last_norm = {"BasicBlock": "bn2", "Bottleneck": "bn3"}
    assert [(s["anchor"], s["position"], s["slot"]) for s in sites] == [
        (last_norm[type(base.get_submodule(s["path"])).__name__], "after", slot) for s in sites]
    printed = run(model, "--dry-run", "--seed", "0", "--input-size", "64").stdout
    line = next(x for x in printed.splitlines() if x.startswith("where in each block: "))
    for anchor in {s["anchor"] for s in sites}:
        n = sum(s["anchor"] == anchor for s in sites)
        assert f"after {anchor}{f', in its {slot} slot' if slot else ''} ({n} blocks)" in line


def test_json_report_fields(tmp_path):
    result = run("timm:test_resnet", "--json", "-o", str(tmp_path / "o"), "--seed", "0")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("model", "sites", "params", "macs", "se_elementwise_ops", "input_size", "output"):
        assert key in data
    assert data["output"] == str(tmp_path / "o")
    site = data["sites"][0]
    assert {"path", "recipe", "channels", "squeeze_channels", "params"} <= set(site)
    assert set(data["params"]) == set(data["macs"]) == {"before", "after", "delta"}
    assert data["params"]["after"] - data["params"]["before"] == data["params"]["delta"] > 0


def test_dry_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("resnet50", "-r", "16", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["output"] is None
    assert data["params"]["delta"] == 2_530_992
    assert list(tmp_path.iterdir()) == []


def test_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("timm:test_resnet", "-r", "8", "--seed", "0").exit_code == 0
    assert (tmp_path / "test_resnet-se8" / "model.safetensors").is_file()


def test_existing_output_exit_1_and_untouched(tmp_path):
    out = tmp_path / "o"
    assert run("timm:test_resnet", "-o", str(out), "--seed", "0").exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    result = run("timm:test_resnet", "-o", str(out), "--seed", "1")
    assert result.exit_code == 1
    assert "--force" in result.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert run("timm:test_resnet", "-o", str(out), "--seed", "1", "--force").exit_code == 0
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["resnt50", "--dry-run"], 1, "did you mean resnet50"),
        (["timm:test_vit", "--recipe", "resnet-residual", "--dry-run"], 1, "no matching blocks"),
        (["resnet50", "-r", "0", "--dry-run"], 2, "reduction"),
        (["resnet50", "-r", "-4", "--dry-run"], 2, "reduction"),
        (["resnet50", "-r", "1.5", "--dry-run"], 2, "reduction"),
        (["resnet50", "--recipe", "nope", "--dry-run"], 2, "resnet-residual"),
        (["resnet50", "--input-size", "0", "--dry-run"], 2, "input size"),
        (["resnet50", "--input-size", "-3", "--dry-run"], 2, "input size"),
        (["resnet50", "--input-size", "abc", "--dry-run"], 2, "input size"),
        (["resnet50", "--init", "zeros", "--dry-run"], 2, "init"),
        (["resnet50", "--divisor", "0", "--dry-run"], 2, "divisor"),
    ],
)
def test_errors_are_one_line_with_exit_code(args, code, text):
    result = run(*args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_recipes_listing():
    result = run("recipes", "--json")
    assert result.exit_code == 0
    recipes = {r["name"]: r for r in json.loads(result.stdout)}
    assert "torchvision.models.resnet.Bottleneck" in recipes["resnet-residual"]["classes"]
    assert recipes["resnet-residual"]["defaults"]["reduction"] == 16
    text = run("recipes")
    assert text.exit_code == 0
    assert "resnet-residual" in text.stdout


def test_version_and_help():
    assert run("--version").stdout.startswith("se-inject ")
    result = run("--help")
    assert result.exit_code == 0
    assert "recipes" in result.stdout
    assert run("inject", "--help").exit_code == 0


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["recipes"]])
def test_fast_paths_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from se_inject.cli.commands import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- answers at once, nothing ignored silently, conventions -----------------------------------------------------------


@pytest.fixture
def no_real_builds(monkeypatch):
    """Planning on the meta device is allowed; building a model with real weights fails the test."""
    import se_inject.api

    real = se_inject.api.build_model

    def guarded(spec, *, device="cpu", seed=None):
        if str(device) != "meta":
            raise AssertionError("a model was built before the check")
        return real(spec, device=device, seed=seed)

    monkeypatch.setattr(se_inject.api, "build_model", guarded)


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["-o", "{existing}"], 1, "already exists"),
        (["-o", "{existing}/report.json"], 1, "not a directory"),
        (["--export", "tflite"], 2, "unknown export format"),
        (["--export", "onnx", "--dry-run"], 2, "--dry-run"),
        (["--dry-run", "--export", "tflite"], 2, "unknown export format"),
        (["--images", "{existing}", "--dry-run"], 2, "--images"),
        (["--opset", "18"], 2, "--export onnx"),
        (["--export", "onnx", "--opset", "7"], 2, "opset"),
        (["--static-batch", "2"], 2, "--export"),
        (["--weights", "{existing}/none.pth"], 1, "no such file"),
    ],
)
def test_fails_before_any_model_is_built(tmp_path, monkeypatch, args, code, text):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.json").write_text("{}")
    monkeypatch.setattr("se_inject.api.resolve_model", lambda name: pytest.fail("resolved a model name"))
    result = run("resnet50", *(a.format(existing=existing) for a in args))
    assert result.exit_code == code, result.stderr
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (existing / "report.json").read_text() == "{}"


def test_default_output_checked_before_the_real_build(tmp_path, monkeypatch, no_real_builds):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_resnet-se16").mkdir()
    (tmp_path / "test_resnet-se16" / "model.safetensors").write_bytes(b"previous")
    result = run("timm:test_resnet", "-r", "16")
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (tmp_path / "test_resnet-se16" / "model.safetensors").read_bytes() == b"previous"


def test_default_folders_of_timm_and_torchvision_differ():
    import se_inject

    _, timm_report = se_inject.inject("timm:resnet18", device="meta", seed=0)
    _, tv_report = se_inject.inject("torchvision:resnet18", device="meta", seed=0)
    assert timm_report.default_output == "resnet18-se16"
    assert tv_report.default_output == "torchvision-resnet18-se16"


def test_ignored_options_become_notes(tmp_path):
    result = run("timm:test_resnet", "--dry-run", "-o", str(tmp_path / "x"), "--json")
    assert result.exit_code == 0, result.stderr
    assert any("--output/--force unused" in n for n in json.loads(result.stdout)["notes"])
    assert not (tmp_path / "x").exists()


def test_images_skip_undecodable_files_with_a_note(tmp_path):
    from torchvision.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        write_png(torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8), str(images / f"{i}.png"))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    result = run("timm:test_resnet", "--images", str(images), "--input-size", "64", "--seed", "0",
                 "-o", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["drift"]["inputs"].startswith("2 images from") and "skipped 1" in data["drift"]["inputs"]
    assert "broken.jpg" in data["drift"]["inputs"]
    assert any("random weights" in n for n in data["notes"])  # --images without --weights/--pretrained
    for p in images.glob("*.png"):
        p.unlink()
    none = run("timm:test_resnet", "--images", str(images), "--input-size", "64", "-o", str(tmp_path / "p"))
    assert none.exit_code == 1 and "none of the 1 files decodes" in none.stderr


def test_seed_in_the_summary(tmp_path):
    drawn = run("timm:test_resnet", "--dry-run")
    assert drawn.exit_code == 0, drawn.stderr
    seed = json.loads(run("timm:test_resnet", "--dry-run", "--json").stdout)["seed"]  # a fresh draw each time
    assert isinstance(seed, int)
    assert "(drawn: --seed " in drawn.stdout and " repeats this run)" in drawn.stdout
    fixed = run("timm:test_resnet", "--dry-run", "--seed", "7")
    assert "seed 7\n" in fixed.stdout and "drawn" not in fixed.stdout


def test_piped_output_does_not_wrap_the_copy_paste_line(tmp_path):
    out = tmp_path / ("a-long-folder-name-" * 4) / "resnet18-se16"
    result = runner.invoke(app, ["timm:resnet18", "--input-size", "64", "--seed", "0", "-o", str(out)],
                           env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.stderr
    line = next(li for li in result.stdout.splitlines() if li.startswith("plain timm loads it"))
    assert f'timm.create_model("local-dir:{out}", pretrained=True) is seresnet18' in line


def test_help_conventions():
    short = run("-h")
    assert short.exit_code == 0 and short.stdout == run("--help").stdout
    assert "--install-completion" in short.stdout  # typer's shell completion
    text = run("inject", "-h").stdout
    for values in ("[se|eca|cbam|cbam-timm|ese]", "[sigmoid|hard-sigmoid]", "[paper|identity]",
                   "[torchscript|exported|onnx]"):
        assert values in text
    assert "<list[str]>" not in text and "<int>" not in text  # readable option types
    assert "[torchscript|exported|onnx]" in run("export", "-h").stdout


def test_the_writer_writes_only_names_the_preflight_check_guards(tmp_path):
    from se_inject.io.ownership import RECORD_FILE
    from se_inject.io.preflight import OUTPUT_FILES

    out = tmp_path / "out"
    result = runner.invoke(app, ["timm:test_resnet", "--input-size", "32", "--seed", "0", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in out.iterdir()} <= {*OUTPUT_FILES, RECORD_FILE}  # and the ownership record
    assert {"model.safetensors", "report.json"} <= {p.name for p in out.iterdir()}


def test_the_vocabulary_is_what_the_library_implements():
    """The names --help lists (`se_inject.names`, torch-free) are the library's implementations: the attention
    builders' registry, the export writers, the gate and activation layers (timm's names), the inits
    `init_attention` accepts."""
    from se_inject.io.export import _WRITERS
    from se_inject.layers.attention import init_attention, list_attention
    from se_inject.layers.squeeze_excite import SqueezeExcite, create_act
    from se_inject.names import ACTIVATIONS, EXPORT_FORMATS, GATES, INITS, VARIANTS

    assert tuple(list_attention()) == tuple(VARIANTS)
    assert tuple(_WRITERS) == tuple(EXPORT_FORMATS)
    for name in (*GATES, *ACTIVATIONS):
        assert isinstance(create_act(name), torch.nn.Module), name
    for init in INITS:
        init_attention(SqueezeExcite(8, rd_channels=2), init)
    with pytest.raises(UsageError, match="unknown init"):
        Settings(init="zeros")


def test_factory_next_to_its_file(tmp_path, monkeypatch):
    from se_inject.engine.resolve import resolve_model

    (tmp_path / "mynets_factory.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 8, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    spec = resolve_model("mynets_factory:make")
    assert spec.source == "python" and spec.name == f"{tmp_path / 'mynets_factory.py'}:make"


def test_scan_says_how_to_see_every_model(capsys):
    from se_inject.cli.render import render_scan
    from se_inject.tools.scan import ScanRow

    render_scan([ScanRow(model=f"m{i}", status="no-match") for i in range(60)], None)
    out = capsys.readouterr().out
    assert "60 models: the table shows up to 50" in out and "--output FILE.csv" in out


def test_compare_table_says_which_statistic_and_warns_when_noisy(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # piped without $COLUMNS: tables are never cut
    from se_inject.cli.render import render_compare
    from se_inject.tools.bench import Timing
    from se_inject.tools.compare import CompareRow

    quiet = Timing(1, 10.0, 10.5, 0.05, 0.04, 0.06, 15, "cpu", 2)
    noisy = Timing(8, 408.0, 408.2, -0.427, -0.6, 0.3, 15, "cpu", 2)  # the paired median disagrees with (b)
    assert not quiet.noisy and noisy.noisy and noisy.ratio_of_medians == pytest.approx(0.2 / 408)
    row = CompareRow("se", 16, 1, 1, 1, 10, 10, latency=(quiet, noisy))
    render_compare("m", [row])
    out, err = capsys.readouterr()
    assert "b8 SE/base (b)" in out and "b8 paired (c) [IQR]" in out and "+0.0%" in out and "-42.7%" in out
    assert "median latency of each model" in out
    assert "too noisy to conclude for se b8" in err and "se b1" not in err


@pytest.mark.slow
def test_closed_pipe_exits_141_and_python_dash_m(tmp_path):
    """`se-inject ... | head -1`: the reader goes away; the writer stops quietly with 141, as Unix tools do."""
    proc = subprocess.Popen([sys.executable, "-m", "se_inject", "timm:test_resnet", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # before anything is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err == b""


@pytest.mark.parametrize(("argv", "code"), [(["--version"], 0), (["--bogus-option"], 2), (["recipes"], 0)])
def test_the_process_exits_fast_but_completely(argv, code):
    """`main` skips the interpreter's module teardown (a second once torch is imported) but keeps what a normal exit
    does: running threads are waited for, exit handlers run, output is flushed, the status is the command's."""
    script = ("import atexit, sys, threading, time\nfrom se_inject.cli.commands import main\n"
              "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
              "class Torn:\n    def __del__(self):\n        print('torn down', file=sys.stderr)\n"
              "torn = Torn()\n"  # a module global: collected only by the interpreter's teardown
              "def work():\n    time.sleep(0.3)\n    print('thread done', file=sys.stderr)\n"
              "threading.Thread(target=work).start()\n"
              f"sys.argv = ['se-inject', *{argv!r}]\nmain()\nprint('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert "handler ran" in result.stderr and "thread done" in result.stderr
    assert result.stderr.index("thread done") < result.stderr.index("handler ran")
    assert "not reached" not in result.stdout and "torn down" not in result.stderr
    if argv == ["recipes"]:
        assert result.stdout.rstrip().endswith(load_recipe_listing_tail())


def load_recipe_listing_tail() -> str:
    """The last line of the recipe listing, printed in process: the fast exit lost nothing of the output."""
    from se_inject.cli.render import print_recipes

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_recipes(as_json=False)
    return buffer.getvalue().rstrip().splitlines()[-1]


def test_cli_and_python_write_the_same_folder(tmp_path):
    """One save function: the CLI's folder and `se_inject.save`'s hold the same files and bytes (the report differs
    only in where it was written), `config.json` included where the result is a timm architecture."""
    import json

    import se_inject

    result = run("timm:resnet18", "--seed", "0", "--output", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    model, report = se_inject.inject("timm:resnet18", seed=0)
    final = se_inject.save(model, report, tmp_path / "python")
    cli, python = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("cli", "python"))
    assert cli == python and "config.json" in cli and final.timm_architecture == "seresnet18"
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "python" / name).read_bytes()
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("cli", "python")]
    for r in reports:
        del r["output"]
    assert reports[0] == reports[1]
