"""Every input gets bounded work: a file the user names is a regular file of a size it can legitimately have, or a
typed one-line error at once; a saved folder is checked from its header before a byte of its weights is hashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_hostile_inputs import within
from test_security import cli, contents, craft, one_line

import se_inject
from se_inject import CheckpointError
from se_inject.errors import ExportError
from se_inject.io.checkpoint_file import write_safetensors_file


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path_factory.mktemp("good") / "out"
    se_inject.save(model, report, directory)
    return directory


# --- files the user names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder", "too large"])
def test_a_recipe_file_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "r.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 30)  # sparse: a GiB of nothing
    result = within(60, cli, "timm:test_resnet", "--dry-run", "--recipe-file", str(path))
    one_line(result, 2, str(path), "regular file" if kind != "too large" else "more than")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder", "char device"])
def test_a_weights_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "w.pth"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "/dev/zero" else "/dev/null")
    result = within(60, cli, "timm:test_resnet", "--dry-run", "--weights", str(path))
    one_line(result, 1, str(path), "not a regular file")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_weights_file_larger_than_the_machines_memory_is_refused_before_it_is_read(tmp_path, monkeypatch, suffix):
    from se_inject.engine import weights

    path = tmp_path / f"w{suffix}"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: a GiB of nothing, on a machine said to have 1 MiB
    monkeypatch.setattr(weights, "machine_memory", lambda: 1 << 20)
    with pytest.raises(se_inject.WeightsError, match=r"more than the 1\.0 MiB"):
        within(10, weights.read_state_dict, path)


def test_a_safetensors_header_longer_than_its_file_is_refused_before_it_is_parsed(tmp_path):
    from se_inject.engine.weights import read_state_dict

    path = tmp_path / "w.safetensors"
    path.write_bytes((50_000_000).to_bytes(8, "little") + b"{}")
    with pytest.raises(se_inject.WeightsError, match="header of 50,000,000 bytes in a file of 10 bytes"):
        read_state_dict(path)


def _animated_gif(path: Path, frames: int, side: int) -> None:
    from PIL import Image

    images = [Image.new("L", (side, side), i) for i in range(frames)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=10)


def test_an_animated_image_is_skipped_from_its_header(tmp_path):
    from torchvision.io import write_png

    from se_inject.engine.drift import image_batch

    (tmp_path / "i").mkdir()
    _animated_gif(tmp_path / "i" / "a.png", 3, 64)  # a GIF named .png: torchvision would decode every frame
    write_png(torch.zeros(3, 40, 50, dtype=torch.uint8), str(tmp_path / "i" / "ok.png"))
    x, text = within(60, image_batch, tmp_path / "i", (3, 32, 32))
    assert tuple(x.shape) == (1, 3, 32, 32)
    assert "a.png" in text


def test_an_image_file_longer_than_its_pixels_need_is_skipped(tmp_path):
    from torchvision.io import write_png

    from se_inject.engine.drift import _read_image

    write_png(torch.zeros(3, 4, 5, dtype=torch.uint8), str(tmp_path / "a.png"))
    os.truncate(tmp_path / "a.png", 16 << 30)  # a valid PNG header, then 16 GiB of (sparse) nothing
    start = time.perf_counter()
    with pytest.raises(se_inject.SEInjectError, match="more than a 5x4 image needs"):
        _read_image(tmp_path / "a.png")
    assert time.perf_counter() - start < 5


# --- a saved folder: the header first -----------------------------------------------------------------------------


def _with_header_edit(good: Path, target: Path, edit) -> Path:
    metadata, tensors = contents(good)
    edit(tensors)
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(target / "model.safetensors", tensors, metadata)
    return target


def test_a_huge_sparse_tensor_is_refused_before_it_is_hashed(good, tmp_path):
    folder = craft(good, tmp_path / "f")
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["zzz.huge"] = {"dtype": "F32", "shape": [4 << 30], "data_offsets": [end, end + (16 << 30)]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + size :])
    os.truncate(file, 8 + len(blob) + end + (16 << 30))  # a sparse 16 GiB file the header accounts for
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="unexpected keys"):
        se_inject.load(folder)
    assert time.perf_counter() - start < 10  # hashed first, it took 85 s


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float8_e4m3fn])
def test_a_single_tensor_in_another_precision_is_refused_at_load(good, tmp_path, dtype):
    folder = _with_header_edit(good, tmp_path / "f",
                               lambda t: t.update({"fc.weight": t["fc.weight"].to(dtype)}))
    with pytest.raises(CheckpointError, match="mixed precisions"):
        se_inject.load(folder, verify_weights=False)


def test_a_model_saved_in_half_precision_still_loads(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    se_inject.save(model.half(), report.plan, tmp_path / "h")
    loaded = se_inject.load(tmp_path / "h")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}


# --- memory: what the work keeps, before it allocates -------------------------------------------------------------


def test_a_dry_run_at_a_huge_video_size_is_refused_before_any_work(monkeypatch):
    import se_inject.engine.memory

    monkeypatch.setattr(se_inject.engine.memory, "machine_memory", lambda: 8 * 2**30)
    start = time.perf_counter()
    result = cli("torchvision:r3d_18", "--dry-run", "--input-size", "16384,112,112")
    one_line(result, 2, "3x16384x112x112", "GiB, more than")  # it verified blocks on real tensors: 26 GB and more
    assert time.perf_counter() - start < 60


def test_export_checks_memory_for_every_batch_it_keeps(tmp_path, monkeypatch):
    import se_inject.engine.memory
    from se_inject.engine.memory import forward_bytes
    from se_inject.io.export import export

    model, report = se_inject.inject("timm:test_resnet", seed=0, input_size=1100, device="meta")
    one_batch = forward_bytes(model, report.plan.input_size)
    monkeypatch.setattr(se_inject.engine.memory, "machine_memory", lambda: int(one_batch * 1.5))
    se_inject.engine.memory.check_forward_memory(model, report.plan.input_size)  # one batch fits ...
    with pytest.raises(ExportError, match=r"exporting \(batches 2, 1, 3, inputs kept\) needs about"):
        export(model, report.plan, "torchscript", tmp_path / "m.pt")  # ... the three export keeps do not
    assert list(tmp_path.iterdir()) == []


# --- typed one-line errors ----------------------------------------------------------------------------------------


def test_a_recipe_when_on_a_tensor_attribute_is_a_usage_error(tmp_path):
    (tmp_path / "tensor_model.py").write_text(
        "import timm\nimport torch\n\n\ndef build():\n    model = timm.create_model('test_resnet')\n"
        "    for block in model.modules():\n        if type(block).__name__ == 'BasicBlock':\n"
        "            block.scale = torch.ones(2)\n    return model\n")
    (tmp_path / "r.toml").write_text('name = "when-tensor"\ndescription = "x"\n\n[[blocks]]\n'
                                     'classes = ["timm.models.resnet.BasicBlock"]\nafter = "bn2"\nslot = "se"\n'
                                     "when = { scale = 1 }\n")
    result = cli(f"{tmp_path / 'tensor_model.py'}:build", "--dry-run", "--recipe-file", str(tmp_path / "r.toml"),
                 "--recipe", "when-tensor")
    one_line(result, 2, "BasicBlock.scale is a Tensor")


@pytest.mark.parametrize(("factory", "text"), [("builtins:exit", "raised SystemExit"),
                                               ("builtins:breakpoint", "debugger")])
def test_a_factory_that_exits_or_debugs_is_a_one_line_error(factory, text):
    """In a process of its own: pytest replaces the debugger hook. No input: the debugger reads end of file."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONBREAKPOINT", "SE_INJECT_DEBUG")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "se_inject", factory, "--dry-run"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, env=env, timeout=120, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and text in lines[0], result.stderr


def test_several_sites_on_one_block_each_run_once_and_round_trip(tmp_path):
    import dataclasses

    from se_inject.engine.build import build_model
    from se_inject.engine.surgery import apply_plan

    _, report = se_inject.inject("timm:test_resnet", seed=1, device="meta")
    first = report.plan.sites[0]
    width = build_model(report.plan.model, device="meta").get_submodule(first.path).bn1.num_features
    extra = [dataclasses.replace(first, name=f"attn{i}", slot=None, anchor="bn1", position="after",
                                 attention=dataclasses.replace(first.attention, channels=width)) for i in range(2)]
    plan = dataclasses.replace(report.plan, sites=(first, *extra, *report.plan.sites[1:]))
    model = apply_plan(build_model(plan.model, seed=1), plan).eval()
    calls: dict[str, int] = {}
    for name in (first.path, first.module_path, *(s.module_path for s in extra)):
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, _a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x = torch.randn(1, 3, 32, 32)
    y = model(x)
    assert set(calls.values()) == {1}, calls  # one module per site, each called once per call of its block
    se_inject.save(model, plan, tmp_path / "o")
    assert torch.equal(se_inject.load(tmp_path / "o")(x), y)


# --- exports replace only a regular file, never one of the folder they read ------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "report.json", ".se-inject.json"])
def test_an_export_never_replaces_the_folder_it_reads(good, tmp_path, name):
    import shutil

    folder = tmp_path / "o"
    shutil.copytree(good, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    one_line(cli("export", str(folder), "-f", "torchscript", "-o", str(folder / name), "--force"), 1,
             "part of the saved folder")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("kind", ["character device", "symlink", "fifo"])
def test_an_export_never_replaces_anything_but_a_regular_file(good, tmp_path, kind):
    import stat

    target = tmp_path / "m.pt"
    if kind == "character device":
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    elif kind == "symlink":
        (tmp_path / "mine.pt").write_bytes(b"mine")
        target.symlink_to(tmp_path / "mine.pt")
    else:
        os.mkfifo(target)
    before = os.lstat(target)
    one_line(within(120, cli, "export", str(good), "-f", "torchscript", "-o", str(target), "--force"), 1,
             "not a regular file")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)


# --- round trips: what save writes, load reads ----------------------------------------------------------------------


def test_a_plan_load_would_refuse_is_refused_at_save_naming_the_limit(tmp_path, good):
    recipe = tmp_path / "long.toml"
    recipe.write_text('name = "long-source"\ndescription = "x"\n\n[[blocks]]\n'
                      'classes = ["timm.models.resnet.BasicBlock"]\nafter = "bn2"\nslot = "se"\n'
                      f'source = "{"x" * 1500}"\n')
    model, report = se_inject.inject("timm:test_resnet", seed=0, recipes=["long-source", recipe])
    with pytest.raises(se_inject.SEInjectError, match="at most 1,000 characters, got 1,500"):
        se_inject.save(model, report.plan, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    folder = craft(good, tmp_path / "f", lambda p: p["sites"][0].update(source="x" * 1500))
    with pytest.raises(CheckpointError, match=r"sites\[0\]\.source': expected at most 1,000 characters"):
        se_inject.load(folder)


def test_a_site_in_a_detectors_heads_is_refused_at_load(tmp_path):
    import dataclasses

    from se_inject.engine.build import build_model
    from se_inject.engine.surgery import apply_plan

    _, report = se_inject.inject("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", se_inject.Settings(fill=True),
                                 seed=0, device="meta")
    first = report.plan.sites[0]
    head = dataclasses.replace(first, path="rpn.head.conv.0", block="torchvision.ops.misc.Conv2dNormActivation",
                               anchor="0", position="after", slot=None, name="attn", source="",
                               attention=dataclasses.replace(first.attention, channels=256, rd_channels=64))
    plan = dataclasses.replace(report.plan, sites=(*report.plan.sites, head))
    model = apply_plan(build_model(plan.model, seed=0), plan)  # the run-check stops at the backbone: unseen
    se_inject.save(model, plan, tmp_path / "o")
    with pytest.raises(CheckpointError, match=r"sites\[7\]\.path'.*outside the detector's backbone"):
        se_inject.load(tmp_path / "o")
