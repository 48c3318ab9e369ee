"""The command line: default command, JSON report, exit codes, one-line errors, fast start without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from se_inject.cli import app

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
        (["timm:test_vit", "--dry-run"], 1, "no matching blocks"),
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
        "from se_inject.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
