"""Recipe files: the shipped ones are valid, and every kind of mistake in a file is named precisely."""

from __future__ import annotations

import pytest

from se_inject import RecipeFileError, UnknownRecipeError, get_recipe, list_recipes, load_recipe_file
from se_inject.engine.recipe_files import resolve_recipes

VALID = """
name = "toy"
description = "SE after the toy block's norm"
[defaults]
reduction = 8
[[blocks]]
classes = ["mypkg.models.ToyBlock"]
after = "bn"
"""


def test_shipped_recipes_parse_and_name_full_class_paths():
    names = list_recipes()
    assert "resnet-residual" in names
    for name in names:
        recipe = get_recipe(name)
        assert recipe.blocks or recipe.patterns
        assert all(c.count(".") >= 2 for c in recipe.classes), "classes are matched by full class path"


def test_resnet_residual_distinguishes_timm_and_torchvision_classes():
    recipe = get_recipe("resnet-residual")
    assert recipe.rule_for("timm.models.resnet.Bottleneck").slot == "se"
    assert recipe.rule_for("torchvision.models.resnet.Bottleneck").slot is None
    assert recipe.rule_for("Bottleneck") is None


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(UnknownRecipeError, match="resnet-residual"):
        get_recipe("resnet")


def test_valid_file_loads(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(VALID)
    recipe = load_recipe_file(path)
    assert recipe.name == "toy"
    assert recipe.defaults.reduction == 8
    assert recipe.defaults.rd_divisor == 8  # unspecified defaults keep the SE paper's/timm's values
    assert recipe.blocks[0].anchor == "bn"
    assert recipe.blocks[0].position == "after"
    assert [r.name for r in resolve_recipes("toy", (path,))] == ["toy"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name = 'x'\n[[blocks]\n", "invalid TOML"),
        (VALID + "\ncolour = 'red'\n", "colour"),
        (VALID.replace('name = "toy"', "name = 3"), "'name'"),
        (VALID.replace('reduction = 8', 'reduction = "8"'), "defaults.reduction"),
        (VALID.replace('reduction = 8', "reduction = 0"), "defaults.reduction"),
        (VALID.replace('reduction = 8', "gate = 'tanh'"), "defaults.gate"),
        (VALID.replace('reduction = 8', "speed = 1"), "speed"),
        (VALID.replace('after = "bn"', ""), "exactly one of 'after' or 'before'"),
        (VALID.replace('after = "bn"', 'after = "bn"\nbefore = "conv"'), "exactly one of 'after' or 'before'"),
        (VALID.replace('"mypkg.models.ToyBlock"', '"ToyBlock"'), "blocks[0].classes"),
        (VALID.replace('after = "bn"', "after = 1"), "blocks[0].after"),
        (VALID.replace('after = "bn"', 'after = "bn"\nslot = "se"\nname = "attn"'), "blocks[0].name"),
        (VALID.replace('after = "bn"', 'after = "bn"\nrequire = ["magic"]'), "blocks[0].require"),
        (VALID.replace('after = "bn"', 'after = "bn"\nwithin = "mypkg.Net"'), "blocks[0].within"),
        (VALID.replace('after = "bn"', 'after = "bn"\nnot_within = ["a b"]'), "blocks[0].not_within"),
        ("name = 'toy'\nblocks = []\n", "'blocks'"),
        ("description = 'no name'\n", "missing field"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeFileError) as info:
        load_recipe_file(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert info.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(RecipeFileError, match="no such file"):
        load_recipe_file(tmp_path / "nope.toml")


@pytest.mark.slow
def test_wheel_ships_the_recipes(tmp_path):
    """The top-level recipes/ folder travels inside the package, for wheel installs too (not only editable)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in (root / "recipes").glob("*.toml"):
        assert f"se_inject/recipe_files/{recipe.name}" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    listed = subprocess.run(
        [sys.executable, "-c", "import se_inject, sys; print(se_inject.__file__); print(se_inject.list_recipes())"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}, timeout=60,
    ).stdout.splitlines()
    assert listed[0].startswith(str(target))
    assert listed[1] == str(list_recipes())


def test_recipes_listing_tells_rules_of_one_class_apart():
    """Two byobnet rules name BottleneckBlock; the listing says which blocks each one takes."""
    from typer.testing import CliRunner

    from se_inject.cli.commands import app

    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines() if "byobnet.BottleneckBlock" in line]
    assert len(lines) == 3 and len(set(lines)) == 3
    assert any(line.endswith("in blocks with a depthwise conv") for line in lines)
    assert any(line.endswith("in blocks without a depthwise conv") for line in lines)  # the SE paper's place
    assert any("in blocks without a depthwise conv; family design (timm seresnet33ts" in line for line in lines)
