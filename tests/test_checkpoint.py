"""Saving and loading: self-describing checkpoints, strict exact round trips, refusing to overwrite, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from family_checks import scales_in_place
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import se_inject
from se_inject import CheckpointError, OutputExistsError
from se_inject.io.checkpoint import PLAN_KEY, read_plan
from se_inject.io.checkpoint_file import WEIGHTS_HASH_KEY


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path_factory.mktemp("ckpt") / "out"
    se_inject.save(model, report, directory)
    return model.eval(), report, directory


def test_folder_holds_weights_with_plan_and_report(saved):
    model, report, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [".se-inject.json", "model.safetensors", "report.json"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert json.loads(meta[PLAN_KEY])["sites"][0]["path"] == report.plan.sites[0].path
    assert json.loads(meta["se_inject.versions"])["torch"] == torch.__version__
    assert json.loads((directory / "report.json").read_text())["params"] == report.to_dict()["params"]
    assert read_plan(directory) == report.plan


def test_load_gives_identical_outputs(saved):
    model, _, directory = saved
    loaded = se_inject.load(directory)
    assert not loaded.training
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_load_from_a_user_model(tmp_path):
    base = torchvision.models.resnet18()
    model, report = se_inject.inject(base, seed=0)
    se_inject.save(model, report.plan, tmp_path / "o")
    with pytest.raises(CheckpointError, match="pass the base model"):
        se_inject.load(tmp_path / "o")
    loaded = se_inject.load(tmp_path / "o", model=torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_refuses_to_overwrite_without_force(saved, tmp_path):
    model, report, _ = saved
    directory = tmp_path / "o"
    se_inject.save(model, report.plan, directory)
    before = (directory / "model.safetensors").read_bytes()
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        se_inject.save(model, report.plan, directory)
    assert (directory / "model.safetensors").read_bytes() == before
    se_inject.save(model, report.plan, directory, force=True)
    assert (directory / "notes.txt").read_text() == "mine"  # --force replaces our files only
    assert sorted(p.name for p in directory.iterdir()) == [".se-inject.json", "model.safetensors", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporaries left


def test_failed_write_leaves_nothing(saved, tmp_path, monkeypatch):
    model, report, _ = saved
    import se_inject.io.checkpoint as checkpoint

    def fail(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "state_for_saving", fail)
    with pytest.raises(se_inject.SEInjectError, match="No space left"):
        se_inject.save(model, report.plan, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["missing", "not-safetensors", "no-plan", "tampered-plan", "wrong-weights"])
def test_load_errors_say_which(saved, tmp_path, damage):
    _model, _report, directory = saved
    target = tmp_path / "bad"
    target.mkdir()
    file = target / "model.safetensors"
    state = load_file(str(directory / "model.safetensors"))
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    expected = {
        "missing": "no model.safetensors",
        "not-safetensors": "not a valid safetensors file",
        "no-plan": "no se-inject plan",
        "tampered-plan": r"plan in its metadata was modified \(checksum mismatch\)",  # not the weights digest's
        "wrong-weights": "do not match the plan",
    }[damage]
    if damage == "not-safetensors":
        file.write_bytes(b"\x00" * 64)
    elif damage == "no-plan":
        save_file(state, str(file), metadata={"format": "pt"})
    elif damage == "tampered-plan":
        save_file(state, str(file), metadata={**meta, PLAN_KEY: meta[PLAN_KEY].replace('"paper"', '"identity"')})
    elif damage == "wrong-weights":
        state.pop(next(k for k in state if k.endswith("se.fc1.weight")))
        save_file(state, str(file), metadata={k: v for k, v in meta.items() if k != WEIGHTS_HASH_KEY})
    with pytest.raises(CheckpointError, match=expected):
        se_inject.load(target)


def test_seeded_runs_are_byte_identical(tmp_path):
    for name in ("a", "b"):
        model, report = se_inject.inject("timm:test_resnet", seed=7)
        (tmp_path / name).mkdir()
        with pytest.MonkeyPatch.context() as patch:  # the report names its folder: the same relative one
            patch.chdir(tmp_path / name)
            se_inject.save(model, report, "out")
    for file in ("model.safetensors", "report.json"):
        assert (tmp_path / "a" / "out" / file).read_bytes() == (tmp_path / "b" / "out" / file).read_bytes()


def test_loaded_model_keeps_the_in_place_decisions(saved):
    model, report, directory = saved
    loaded = se_inject.load(directory)
    flags = [scales_in_place(loaded, s) for s in report.plan.sites]
    assert flags == [scales_in_place(model, s) for s in report.plan.sites]
    assert all(flags)
