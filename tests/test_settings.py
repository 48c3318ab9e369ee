"""One settings record: every producer (CLI, Python API, recipe file, saved plan) makes `SESettings`, which checks
itself; the sources compose by one rule (`site_settings`); plans from before the record still load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli import app
from se_inject.engine.recipe_files import parse_recipe
from se_inject.engine.schema import PlanSchemaError, plan_from_data
from se_inject.errors import RecipeFileError, UsageError
from se_inject.io.checkpoint import PLAN_HASH_KEY, PLAN_KEY, read_plan
from se_inject.io.checkpoint_file import WEIGHTS_HASH_KEY
from se_inject.settings import LIBRARY, OPTION_KEYS, SESettings, Settings, SettingsError, compose, site_settings

# A plan as se-inject wrote it before the settings record: the user's options in the CLI's words.
OLD_PLAN = {
    "format": "se-inject.plan/1",
    "model": {"source": "timm", "name": "test_resnet"},
    "input_size": [3, 160, 160],
    "init": "paper",
    "seed": 0,
    "settings": {"attention": "se", "reduction": 8, "divisor": None, "bias": None, "gate": "hard-sigmoid",
                 "init": "paper", "include": ["layer1.*"], "exclude": [], "min_channels": 0, "fill": False},
    "sites": [{"path": "layer1.0", "recipe": "resnet-residual", "block": "timm.models.resnet.BasicBlock",
               "anchor": "bn2", "position": "after", "slot": "se", "name": "se",
               "attention": {"kind": "se", "channels": 32, "rd_channels": 8, "kernel_size": 0, "bias": True,
                             "gate": "hard-sigmoid", "gain": 1.0, "act": "silu", "norm": True}}],
}


def test_an_old_plan_migrates_to_the_record_and_writes_its_sites_as_before():
    plan = plan_from_data(json.loads(json.dumps(OLD_PLAN)))
    assert plan.settings == Settings(attn_layer="se", rd_ratio=1 / 8, gate_layer="hard-sigmoid",
                                     include=("layer1.*",))
    assert plan.settings.reduction == 8
    spec = plan.sites[0].attention
    assert (spec.attn_layer, spec.gate_layer, spec.act_layer, spec.norm_layer, spec.layout, spec.host_gain) == (
        "se", "hard-sigmoid", "silu", "batchnorm", "fc", 1.0)
    assert plan.to_dict()["sites"] == OLD_PLAN["sites"]  # a site's keys are the ones the plan always had
    assert plan_from_data(json.loads(plan.to_json())) == plan  # and the new plan reads back the same


def test_a_folder_saved_with_old_settings_loads(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    se_inject.save(model, report.plan, tmp_path / "new")
    file = tmp_path / "new" / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    plan = json.loads(metadata[PLAN_KEY])
    plan["settings"] = {"attention": "se", "reduction": None, "divisor": None, "bias": None, "gate": None,
                        "init": "paper", "include": [], "exclude": [], "min_channels": 0}  # before fill/placement
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    metadata.update({PLAN_KEY: text, PLAN_HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})
    del metadata[WEIGHTS_HASH_KEY]  # folders from before the weights digest
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata)
    loaded = se_inject.load(tmp_path / "old")
    assert read_plan(tmp_path / "old").settings == Settings(attn_layer="se")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(("key", "value", "field", "python"), [
    ("reduction", 0, "reduction", 0.0),
    ("divisor", 0, "divisor", 0),
    ("divisor", 4096, "divisor", 4096),
    ("gate", "tanh", "gate", "tanh"),
    ("attention", "gc", "attention", "gc"),
    ("init", "zeros", "init", "zeros"),
    ("placement", "twin", "placement", "twin"),
    ("min_channels", -1, "min_channels", -1),
])
def test_one_check_for_every_producer(key, value, field, python):
    """The same bad value is refused by the record's own check, whoever makes the record: the Python API (timm's
    names), the CLI and a recipe file (their own names: the error says the name the user wrote), a saved plan."""
    name = OPTION_KEYS.get(key, key)
    with pytest.raises(SettingsError, match=name) as raised:
        se_inject.inject("timm:test_resnet", Settings(**{name: python}), device="meta")
    result = CliRunner().invoke(app, ["timm:test_resnet", "--dry-run", f"--{key.replace('_', '-')}", str(value)])
    assert result.exit_code == 2 and field.replace("_", "-") in result.output.replace("_", "-")
    if key in ("divisor", "gate", "attention", "init", "placement"):  # the same reason, in the user's words
        assert raised.value.reason.replace("{field}", field) in result.output
    if key in ("reduction", "divisor", "gate"):
        table = {"name": "toy", "defaults": {key: value}, "blocks": [{"classes": ["a.B"], "after": "bn"}]}
        with pytest.raises(RecipeFileError, match=f"defaults.{key}"):
            parse_recipe(table, "toy.toml")
    if key in ("gate", "attention"):
        data = json.loads(json.dumps(OLD_PLAN))
        data["sites"][0]["attention"][{"attention": "kind"}.get(key, key)] = value
        with pytest.raises(PlanSchemaError, match=r"sites\[0\]\.attention\."):
            plan_from_data(data)


def test_strings_become_typed_values_at_the_edge():
    settings = Settings.parse({"reduction": 4, "include": ["a.*"], "norm": True}, {"reduction": "rd_ratio",
                                                                                   "norm": "norm_layer"})
    assert settings.rd_ratio == 0.25 and settings.include == ("a.*",) and settings.norm_layer == "batchnorm"
    with pytest.raises(SettingsError, match="rd_ratio"):
        SESettings(rd_ratio=0.3)  # not 1 / r
    with pytest.raises(SettingsError, match="channels"):
        Settings(channels=8)  # a site's own, not a user setting
    with pytest.raises(SettingsError, match="kernel_size"):
        SESettings(attn_layer="eca", channels=8, rd_channels=0, kernel_size=4)
    assert isinstance(SettingsError("x", "y"), UsageError)  # exit 2 in the CLI
    assert Settings(act_layer=torch.nn.SiLU, gate_layer=torch.nn.Hardsigmoid).to_dict()["act_layer"] == "silu"
    assert Settings(gate_layer=torch.nn.Hardsigmoid).gate_layer == "hard-sigmoid"
    with pytest.raises(SettingsError, match="act_layer"):
        Settings(act_layer=torch.nn.Tanh)  # no name se-inject builds


def test_the_composition_rule():
    family = SESettings(rd_ratio=1 / 4, rd_round="round", act_layer="silu")  # timm EfficientNet's SE
    assert site_settings(family, Settings()) == compose(LIBRARY, family)
    # a variant's own gate and bias beat the family's; its rounding only where the family rounds to a divisor
    cbam = site_settings(family, Settings(attn_layer="cbam-timm"))
    assert (cbam.rd_round, cbam.bias) == ("round", False)
    cbam = site_settings(SESettings(), Settings(attn_layer="cbam-timm"))
    assert (cbam.rd_round, cbam.bias) == ("half-up", False)
    assert site_settings(SESettings(), Settings(attn_layer="cbam")).rd_divisor == 1
    assert site_settings(SESettings(), Settings(attn_layer="ese")).gate_layer == "hard-sigmoid"
    # the user's beat everything, and a user's divisor means rounding to it
    user = site_settings(family, Settings(attn_layer="ese", gate_layer="sigmoid", rd_divisor=4, bias=False))
    assert (user.gate_layer, user.rd_divisor, user.rd_round, user.bias) == ("sigmoid", 4, "divisible", False)
    assert (user.act_layer, user.reduction) == ("silu", 4)  # what the user left alone: the family's


def test_python_user_sets_any_se_field():
    _, report = se_inject.inject("timm:test_resnet", Settings(rd_ratio=1 / 4, act_layer="silu", layout="conv"),
                                 device="meta", seed=0)
    spec = report.plan.sites[0].attention
    assert (spec.rd_channels, spec.act_layer, spec.layout) == (8, "silu", "conv")


def test_lazy_public_names_are_listed():
    names = dir(se_inject)
    assert {"inject", "load", "save", "Settings", "SESettings", "SqueezeExcite"} <= set(names)
    assert set(se_inject.__all__) <= set(names)
