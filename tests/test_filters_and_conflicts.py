"""Site filters, plan replay checks, several recipes on one model, and the report at 80 columns."""

from __future__ import annotations

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import se_inject
from se_inject import SurgeryError, UsageError
from se_inject.api import Settings, make_plan
from se_inject.cli.commands import app
from se_inject.engine.find import find_sites
from se_inject.engine.recipe_files import get_recipe, resolve_recipes
from se_inject.engine.surgery import apply_plan

runner = CliRunner()


def test_include_without_wildcard_is_exactly_that_site():
    _, report = se_inject.inject("timm:resnet50", se_inject.Settings(include=["layer3.0"]), device="meta", seed=0)
    assert [s.path for s in report.plan.sites] == ["layer3.0"]


def test_exclude_without_wildcard_removes_exactly_that_site():
    _, report = se_inject.inject("timm:resnet50", se_inject.Settings(exclude=["layer4.2"]), device="meta", seed=0)
    paths = [s.path for s in report.plan.sites]
    assert len(paths) == 15 and "layer4.2" not in paths and "layer4.1" in paths


def test_apply_plan_refuses_a_block_of_another_class_naming_the_path():
    model = torchvision.models.resnet18().eval()
    findings = find_sites(model, [get_recipe("resnet-residual")], (3, 64, 64))
    plan, _ = make_plan(findings, Settings(), model=None, seed=0)
    other = torchvision.models.resnet18()
    other.layer2[1] = torchvision.models.resnet.Bottleneck(128, 32)  # same place, another class
    with pytest.raises(SurgeryError, match=r"'layer2\.1'.*Bottleneck"):
        apply_plan(other, plan)


def test_find_sites_output_shapes_are_the_models_output():
    model = torchvision.models.resnet18().to("meta")
    findings = find_sites(model, [get_recipe("resnet-residual")], (3, 64, 64), count_base=True)
    assert findings.output_shapes == ((1, 1000),)
    assert find_sites(model, [get_recipe("resnet-residual")], (3, 64, 64)).output_shapes == ((1, 1000),)


def _recipe_file(tmp_path, name: str, cls: str, place: str, reduction: int = 16):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\n[defaults]\nreduction = {reduction}\n[[blocks]]\nclasses = ["{cls}"]\n'
                    f'after = "{place}"\n')
    return path


BASIC = "torchvision.models.resnet.BasicBlock"


def test_recipes_that_do_not_overlap_are_each_applied(tmp_path):
    files = [_recipe_file(tmp_path, "basic", BASIC, "bn2"),
             _recipe_file(tmp_path, "inverted", "torchvision.models.mobilenetv2.InvertedResidual", "conv.1")]

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.res = torchvision.models.resnet.BasicBlock(16, 16)
            self.mbv2 = torchvision.models.mobilenetv2.InvertedResidual(16, 16, 1, 2)

        def forward(self, x):
            return self.mbv2(self.res(self.stem(x)))

    _, report = se_inject.inject(Two(), recipes=["basic", "inverted", *files], input_size=16, seed=0)
    assert {s.path: s.recipe for s in report.plan.sites} == {"res": "basic", "mbv2": "inverted"}


def test_the_same_place_twice_is_one_site(tmp_path):
    files = [_recipe_file(tmp_path, "one", BASIC, "bn2"), _recipe_file(tmp_path, "two", BASIC, "bn2")]
    _, report = se_inject.inject("torchvision:resnet18", device="meta", seed=0, recipes=["one", "two", *files])
    assert len(report.plan.sites) == 8 and report.plan.recipes == ("one",)


def test_conflicting_recipes_are_a_usage_error_naming_both(tmp_path):
    files = [_recipe_file(tmp_path, "one", BASIC, "bn2"), _recipe_file(tmp_path, "two", BASIC, "bn2", reduction=4)]
    with pytest.raises(UsageError, match=r"'one'.*'two'.*same place with different settings"):
        se_inject.inject("torchvision:resnet18", device="meta", seed=0, recipes=[*files])
    options = [a for f in files for a in ("--recipe-file", str(f))]
    result = runner.invoke(app, ["torchvision:resnet18", "--dry-run", *options])
    assert result.exit_code == 2
    assert "one" in result.stderr and "two" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_recipes_at_different_places_of_one_block_are_each_applied(tmp_path):
    files = [_recipe_file(tmp_path, "one", BASIC, "bn2"), _recipe_file(tmp_path, "two", BASIC, "bn1")]
    model = torchvision.models.resnet18().eval()
    injected, report = se_inject.inject(model, se_inject.Settings(init="identity"), seed=0, recipes=[*files],
                                        input_size=32)
    blocks = [p for p, m in model.named_modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert {(s.path, s.recipe) for s in report.plan.sites} == {
        *((f"{b}.bn2", "one") for b in blocks), *((f"{b}.bn1", "two") for b in blocks)}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(injected.eval()(x), model(x), rtol=0, atol=0)  # identity SE: the same model
    keys = set(injected.state_dict())
    assert set(model.state_dict()) <= keys and f"{blocks[0]}.bn1.se.fc1.weight" in keys
    torch.nn.init.normal_(injected.get_submodule(f"{blocks[0]}.bn1.se.fc2.weight".rsplit(".", 1)[0]).weight)
    # BatchNorm2d's forward cannot be traced by fx: the SE wraps it, and TorchScript still compiles the model
    scripted = torch.jit.script(injected)
    torch.testing.assert_close(scripted(x), injected(x))
    assert not torch.equal(injected(x), model(x))


def test_one_recipe_file_per_child_of_a_sequential_gives_one_se_each(tmp_path):
    """The issue's example: 13 recipe files, each naming one ReLU of VGG-16's `features`: 13 SE, the same as the
    shipped conv-chain recipe; a `before` place takes the input of the child."""
    features = torchvision.models.vgg16_bn().features
    relus = [i for i, layer in enumerate(features) if isinstance(layer, torch.nn.ReLU)]
    files = [_recipe_file(tmp_path, f"relu{k}", "torchvision.models.vgg.VGG", f"features.{i}")
             for k, i in enumerate(relus)]
    _, report = se_inject.inject("torchvision:vgg16_bn", device="meta", seed=0,
                                 recipes=[*(f"relu{k}" for k in range(len(relus))), *files])
    _, shipped = se_inject.inject("torchvision:vgg16_bn", device="meta", seed=0, recipes="vgg")
    assert len(relus) == 13 and [s.recipe for s in report.plan.sites] == [f"relu{k}" for k in range(13)]
    assert [(s.path, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (s.path, s.channels, s.squeeze_channels) for s in shipped.plan.sites]
    before = tmp_path / "before.toml"
    before.write_text('name = "before"\n[[blocks]]\nclasses = ["torchvision.models.vgg.VGG"]\nbefore = "features.3"\n')
    _, report = se_inject.inject("torchvision:vgg16_bn", device="meta", seed=0,
                                 recipes=["before", "relu0", "relu1", before, *files[:2]])
    assert [(s.path, s.position) for s in report.plan.sites] == [
        ("features.2", "after"), ("features.3", "before"), ("features.5", "after")]


def test_two_recipes_around_one_child_conflict(tmp_path):
    after = _recipe_file(tmp_path, "after", BASIC, "bn1")
    before = tmp_path / "before.toml"
    before.write_text(f'name = "before"\n[[blocks]]\nclasses = ["{BASIC}"]\nbefore = "bn1"\n')
    with pytest.raises(UsageError, match=r"'after'.*'before'.*both sides of its child 'bn1'"):
        se_inject.inject("torchvision:resnet18", device="meta", seed=0, recipes=[after, before])


def test_a_recipe_file_takes_its_blocks_from_the_shipped_recipe(tmp_path):
    recipes = resolve_recipes("auto", (_recipe_file(tmp_path, "mine", BASIC, "bn2", reduction=4),))
    model = torchvision.models.resnet18().to("meta")
    findings = find_sites(model, recipes, (3, 64, 64))
    assert {m.recipe.name for m in findings.matches} == {"mine"}


def test_report_table_at_80_columns_keeps_every_cell():
    result = runner.invoke(app, ["torchvision:mobilenet_v3_large", "--dry-run", "--fill"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if "SE blocks" in line)]
    assert all(len(line.rstrip()) <= 80 for line in table)  # text lines are never wrapped when piped
    assert "…" not in result.stdout
    rows = [line.split() for line in lines if line.startswith("features.") and "x" in line]
    assert [row[:4] for row in rows] == [["features.1", "1", "16", "8"], ["features.2-3", "2", "64-72", "16-24"],
                                         ["features.7-10", "4", "184-240", "48-64"]]


@pytest.mark.parametrize(("scope", "sites"), [("", 8), ('within = ["torchvision.models.resnet.*"]', 8),
                                              ('within = ["timm.*"]', 0),
                                              ('not_within = ["torchvision.models.resnet.ResNet"]', 0)])
def test_a_class_rule_narrowed_to_models(tmp_path, scope, sites):
    path = tmp_path / "scoped.toml"
    path.write_text(f'name = "scoped"\n[[blocks]]\nclasses = ["{BASIC}"]\nafter = "bn2"\n{scope}\n')
    recipes = resolve_recipes("scoped", (path,))
    findings = find_sites(torchvision.models.resnet18().to("meta"), recipes, (3, 32, 32))
    assert len(findings.matches) == sites
