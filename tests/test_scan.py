"""`se-inject scan`: every model is covered, already has SE, has no matching block, or is an error (a bug)."""

from __future__ import annotations

import csv
import json

import pytest
import timm
from typer.testing import CliRunner

from se_inject.cli.commands import app
from se_inject.tools.scan import model_names, scan, scan_one, summarize, write_rows

runner = CliRunner()


def test_model_names_by_pattern_and_source():
    assert model_names(["resnet18", "mobilenet_v2"]) == [
        "timm:resnet18", "torchvision:mobilenet_v2", "torchvision:resnet18"]
    assert model_names(["resnet18"], source="torchvision") == ["torchvision:resnet18"]
    assert model_names(["torchvision:resnet1*"]) == [
        "torchvision:resnet101", "torchvision:resnet152", "torchvision:resnet18"]


def test_scan_classifies_each_model():
    # vit_base_patch16_18x2_224: parallel blocks whose MLP branches are summed, a branch no pattern ends
    rows = scan(["timm:test_resnet", "timm:seresnet18", "timm:vit_base_patch16_18x2_224",
                 "torchvision:mobilenet_v3_small"])
    status = {r.model: r.status for r in rows}
    assert status == {"timm:test_resnet": "covered", "timm:seresnet18": "already-se",
                      "timm:vit_base_patch16_18x2_224": "no-match", "torchvision:mobilenet_v3_small": "partial-se"}
    partial = rows[3]
    assert partial.sites == 2 and partial.existing == 9  # what --fill would add; the blocks that have SE keep it
    seresnet18 = timm.create_model("seresnet18")
    assert rows[1].existing == sum(isinstance(m, timm.models.resnet.BasicBlock) for m in seresnet18.modules())
    assert summarize(rows) == {"models": 4, "covered": 1, "partial-se": 1, "already-se": 1, "no-match": 1,
                               "error": 0}
    assert rows[2].category == "transformer"  # a no-match says what kind of network it is


def test_scan_one_never_raises():
    row = scan_one("timm:definitely_not_a_model")
    assert row.status == "error" and "unknown model" in row.reason


@pytest.mark.slow
def test_scan_parallel_matches_serial():
    names = ["timm:test_resnet", "timm:test_efficientnet", "torchvision:resnet18"]
    serial = scan(names)
    parallel = scan(names, workers=2)
    assert [(r.model, r.status, r.sites, r.params_delta) for r in serial] == [
        (r.model, r.status, r.sites, r.params_delta) for r in parallel]


def test_scan_output_files(tmp_path):
    rows = scan(["timm:test_resnet", "timm:vit_base_patch16_18x2_224"])
    write_rows(rows, tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["summary"]["covered"] == 1 and len(data["models"]) == 2
    write_rows(rows, tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["covered", "no-match"]


def test_scan_cli_json():
    result = runner.invoke(app, ["scan", "timm:test_resnet", "timm:vit_base_patch16_18x2_224", "--json", "--workers",
                                 "1"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["summary"] == {"models": 2, "covered": 1, "partial-se": 0, "already-se": 0, "no-match": 1,
                               "error": 0}


def test_scan_cli_rejects_bad_output_name(tmp_path):
    result = runner.invoke(app, ["scan", "timm:test_resnet", "--workers", "1", "-o", str(tmp_path / "x.txt")])
    assert result.exit_code == 2
    assert ".csv or .json" in result.stderr


@pytest.mark.sweep
def test_scan_every_model_has_no_errors():
    """The acceptance sweep: every timm and torchvision classification model, zero errors (minutes on 2 cores)."""
    rows = scan(model_names(["*"]), workers=2)
    errors = [f"{r.model}: {r.reason}" for r in rows if r.status == "error"]
    assert not errors, "\n".join(errors)
    counts = summarize(rows)
    assert counts["covered"] + counts["partial-se"] >= 650  # 270 before pattern recipes
    # "no match" only for networks without a convolutional block
    assert {r.category for r in rows if r.status == "no-match"} <= {"transformer", "MLP"}
