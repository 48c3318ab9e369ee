"""A saved folder is data: every way a crafted folder could run code, or pass bad data on, is refused with a typed
error; writes are all or nothing and touch only what se-inject wrote.

Each crafted folder is made as an attacker would: the plan is edited and every checksum recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import se_inject
from se_inject import CheckpointError, SurgeryError
from se_inject.cli.commands import app
from se_inject.engine.plan import Plan, Site
from se_inject.engine.surgery import apply_plan
from se_inject.io import atomic, ownership
from se_inject.io.atomic import write_folder
from se_inject.io.checkpoint import PLAN_HASH_KEY, PLAN_KEY
from se_inject.io.checkpoint_file import DIGEST_PLACEHOLDER, WEIGHTS_HASH_KEY, write_safetensors_file

runner = CliRunner()
EVIL_NAMES = ["se\nimport os", "se\r__import__('os')", 'se"', "se'", "se()", "se\u2028x", "__class__", "__init__",
              "se x", "class", "match", "sé", "", "forward", "training", "conv1", "1se", "a" * 300]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path_factory.mktemp("good") / "out"
    se_inject.save(model, report, directory)
    return model.eval(), report.plan, directory


def contents(directory: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    file = directory / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def craft(source: Path, target: Path, edit_plan=None, state=None) -> Path:
    """A copy of the folder with the plan edited (and its checksum and the weights digest recomputed)."""
    metadata, tensors = contents(source)
    plan = json.loads(metadata[PLAN_KEY])
    if edit_plan is not None:
        edit_plan(plan)
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    metadata.update({PLAN_KEY: text, PLAN_HASH_KEY: hashlib.sha256(text.encode()).hexdigest(),
                     WEIGHTS_HASH_KEY: DIGEST_PLACEHOLDER})
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(target / "model.safetensors", state if state is not None else tensors, metadata)
    return target


def payload(directory: Path, marker: Path) -> Path:
    """A module that leaves `marker` when imported, and a factory that builds the right model."""
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "payload_se_inject_test.py"
    file.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                    "def build():\n    import timm\n    return timm.create_model('test_resnet')\n")
    return file


def set_model(source: str, name: str):
    def edit(plan):
        plan["model"] = {"source": source, "name": name}

    return edit


def set_site(field: str, value, index: int = 0):
    def edit(plan):
        site = plan["sites"][index]
        *parents, last = field.split(".")
        for p in parents:
            site = site[p]
        site[last] = value

    return edit


# --- 1. nothing named by the folder is imported or run ---------------------------------------------------------------


def test_code_named_by_a_folder_never_runs(saved, tmp_path):
    _, _, good = saved
    marker = tmp_path / "pwned"
    file = payload(tmp_path / "folder", marker)
    folder = craft(good, tmp_path / "folder", set_model("python", f"{file}:build"))
    with pytest.raises(CheckpointError, match="trust_code=True"):
        se_inject.load(folder)
    assert not marker.exists()
    assert "payload_se_inject_test" not in sys.modules
    # the user names the model: their own code, nothing from the folder
    loaded = se_inject.load(folder, model=timm.create_model("test_resnet"))
    assert isinstance(loaded, torch.nn.Module)
    assert not marker.exists()
    # the user opts in: now it runs
    se_inject.load(folder, trust_code=True)
    assert marker.exists()
    sys.modules.pop("payload_se_inject_test", None)


@pytest.mark.parametrize("name", ["os:getcwd", "subprocess:getoutput", "builtins:breakpoint"])
def test_standard_library_callables_are_not_called(saved, tmp_path, name):
    folder = craft(saved[2], tmp_path / "f", set_model("python", name))
    with pytest.raises(CheckpointError, match="never runs code named by a folder"):
        se_inject.load(folder)


@pytest.mark.parametrize(("source", "name"), [
    ("timm", "hf-hub:attacker/model"), ("timm", "local-dir:/tmp/x"), ("timm", "../resnet"),
    ("timm", "https://example.com/m"), ("torchvision", "hf-hub:x/y"), ("timm", "no_such_model_in_timm"),
    ("torchvision", "no_such_model"), ("keras", "resnet50"),
])
def test_network_and_unknown_names_are_refused(saved, tmp_path, source, name):
    folder = craft(saved[2], tmp_path / "f", set_model(source, name))
    with pytest.raises(CheckpointError, match=r"model\.(name|source)"):
        se_inject.load(folder)


def test_cli_export_refuses_code_and_says_how_to_proceed(saved, tmp_path):
    marker = tmp_path / "pwned"
    file = payload(tmp_path / "folder", marker)
    folder = craft(saved[2], tmp_path / "folder", set_model("python", f"{file}:build"))
    result = runner.invoke(app, ["export", str(folder), "-f", "torchscript"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--trust-code" in result.stderr and "--model" in result.stderr
    assert not marker.exists() and not (folder / "model.pt").exists()
    factory = tmp_path / "mine.py"  # the user names their own code
    factory.write_text("def build():\n    import timm\n    return timm.create_model('test_resnet')\n")
    result = runner.invoke(app, ["export", str(folder), "-f", "torchscript", "--model", f"{factory}:build"])
    assert result.exit_code == 0, result.stderr
    assert (folder / "model.pt").exists() and not marker.exists()


# --- 2. the plan is validated field by field ------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("attention.channels", "32", "sites[0].attention.channels"),
    ("attention.channels", -1, "sites[0].attention.channels"),
    ("attention.channels", 33, "sites[0].attention.channels"),  # not what the block has
    ("attention.rd_channels", 0, "sites[0].attention.rd_channels"),
    ("attention.kind", "gc", "sites[0].attention.kind"),
    ("attention.gate", "tanh", "sites[0].attention.gate"),
    ("attention.gain", float("nan"), "sites[0].attention.gain"),
    ("attention.bias", 1, "sites[0].attention.bias"),
    ("attention.extra", 1, "sites[0].attention.extra"),
    ("position", "inside", "sites[0].position"),
    ("path", "layer9.0", "layer9.0"),  # no such module
    ("block", "torch.nn.Linear", "expected a torch.nn.Linear"),
    ("slot", "conv1", "sites[0].name"),
    ("path", ["layer1"], "sites[0].path"),
])
def test_bad_plan_fields_are_named(saved, tmp_path, field, value, expected):
    folder = craft(saved[2], tmp_path / "f", set_site(field, value))
    with pytest.raises(CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        se_inject.load(folder)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda p: p.update(seed=-1), "'seed'"),
    (lambda p: p.update(seed=2**70), "'seed'"),
    (lambda p: p.update(init="zeros"), "'init'"),
    (lambda p: p.update(input_size=[3, 10**9, 10]), r"input_size\[1\]"),
    (lambda p: p.update(input_size="224"), "'input_size'"),
    (lambda p: p.update(sites=[]), "'sites'"),
    (lambda p: p.update(sites=[p["sites"][0], p["sites"][0]]), r"sites\[1\]\.name"),
    (lambda p: p.update(format="se-inject.plan/9"), "'format'"),
    (lambda p: p.pop("sites"), "'sites'"),
    (lambda p: p.update(extra=1), "'extra'"),
    (lambda p: p["sites"][0].update(fixed_args={"x\nimport os": 1}), r"sites\[0\]\.fixed_args"),
    (lambda p: p["sites"][0].update(fixed_args={"__class__": None}), r"sites\[0\]\.fixed_args"),
    (lambda p: p["sites"][0].update(fixed_args={"flag": float("inf")}), r"sites\[0\]\.fixed_args\.flag"),
    (lambda p: p["sites"][0].update(fixed_args={"flag": [1]}), r"sites\[0\]\.fixed_args\.flag"),
    (lambda p: p["sites"][0].update(fixed_args=[]), r"sites\[0\]\.fixed_args"),
])
def test_bad_plan_values_are_named(saved, tmp_path, edit, expected):
    folder = craft(saved[2], tmp_path / "f", edit)
    with pytest.raises(CheckpointError, match=expected):
        se_inject.load(folder)


def test_eca_channels_are_checked_against_the_model(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", se_inject.Settings(attn_layer="eca"), seed=0)
    se_inject.save(model, report.plan, tmp_path / "good")
    folder = craft(tmp_path / "good", tmp_path / "f", set_site("attention.channels", 7))  # ECA has no C-sized weight
    with pytest.raises(CheckpointError, match=r"sites\[0\]\.attention\.channels"):
        se_inject.load(folder)


def test_cli_reports_a_bad_plan_as_input_error(saved, tmp_path):
    folder = craft(saved[2], tmp_path / "f", set_site("attention.kind", "gc"))
    result = runner.invoke(app, ["export", str(folder), "-f", "torchscript"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "sites[0].attention.kind" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- 3. only validated identifiers reach generated code --------------------------------------------------------------


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_bad_names_are_refused_at_load(saved, tmp_path, name):
    folder = craft(saved[2], tmp_path / "f", lambda p: p["sites"][0].update(slot=None, name=name))
    with pytest.raises(CheckpointError, match=r"sites\[0\]|attribute"):
        se_inject.load(folder)


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_bad_names_never_reach_the_rewrite(saved, name):
    _, plan, _ = saved
    site = plan.sites[0]
    evil = Plan(plan.model, (Site(site.path, site.recipe, site.block, site.anchor, site.position, None, name,
                                  site.attention),), plan.input_size, seed=plan.seed)
    with pytest.raises(SurgeryError, match="invalid module name"):
        apply_plan(timm.create_model("test_resnet", pretrained=False).to("meta"), evil)


@pytest.mark.parametrize("name", ["x\nimport os", "__class__", "x=1"])
def test_bad_fixed_argument_names_never_reach_the_trace(saved, name):
    _, plan, _ = saved
    site = plan.sites[0]
    evil = Plan(plan.model, (Site(site.path, site.recipe, site.block, site.anchor, site.position, None, "attn",
                                  site.attention, {name: None}),), plan.input_size, seed=plan.seed)
    with pytest.raises(SurgeryError, match="invalid fixed argument name"):
        apply_plan(timm.create_model("test_resnet", pretrained=False).to("meta"), evil)


@pytest.mark.parametrize("name", ["se\nimport os", "se\r", 'x"', "__dict__", "se\u2028", "x()", "for"])
def test_bad_names_are_refused_at_plan_time(tmp_path, name):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "evil"\n[[blocks]]\nclasses = ["timm.models.resnet.BasicBlock"]\nafter = "bn2"\n'
                      f"name = {json.dumps(name)}\n", encoding="utf-8")
    with pytest.raises(se_inject.RecipeFileError, match=r"blocks\[0\]\.name"):
        se_inject.inject("timm:test_resnet", device="meta", recipes=["evil", recipe])


@pytest.mark.parametrize("name", ["evil\n", "Evil", "e vil"])
def test_bad_recipe_names_are_refused(tmp_path, name):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = {json.dumps(name)}\n[[blocks]]\nclasses = ["a.B"]\nafter = "bn2"\n', encoding="utf-8")
    with pytest.raises(se_inject.RecipeFileError, match="'name'"):
        se_inject.load_recipe_file(recipe)


# --- 4. the weights' bytes are verified ----------------------------------------------------------------------------


def _header(file: Path) -> tuple[int, dict]:
    data = file.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


def test_flipped_bit_in_the_weights_is_reported(saved, tmp_path):
    folder = craft(saved[2], tmp_path / "f")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights were modified or damaged"):
        se_inject.load(folder)
    se_inject.load(folder, verify_weights=False)  # the opt-out for huge files: loads what is there


def test_swapped_tensors_are_reported(saved, tmp_path):
    metadata, tensors = contents(saved[2])
    keys = sorted(k for k in tensors if tensors[k].is_floating_point() and tensors[k].numel() > 1)
    a, b = next((x, y) for x in keys for y in keys if x < y and tensors[x].shape == tensors[y].shape)
    (tmp_path / "f").mkdir()
    swapped = {**tensors, a: tensors[b], b: tensors[a]}
    save_file(swapped, str(tmp_path / "f" / "model.safetensors"), metadata=metadata)  # the original's digest
    with pytest.raises(CheckpointError, match="modified or damaged"):
        se_inject.load(tmp_path / "f")


def test_dtype_changed_in_the_header_is_reported(saved, tmp_path):
    folder = craft(saved[2], tmp_path / "f")
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    size, header = _header(file)
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    text = raw[8 : 8 + size].decode()
    entry = json.dumps({key: header[key]}, separators=(",", ":"))[1:-1]
    changed = text.replace(entry, entry.replace('"F32"', '"I32"'))
    assert changed != text
    file.write_bytes(raw[:8] + changed.encode() + raw[8 + size :])
    for verify in (True, False):  # the header is checked against the model before the bytes are hashed
        with pytest.raises(CheckpointError, match=r"dtype torch\.int32 in the file"):
            se_inject.load(folder, verify_weights=verify)


def test_digest_is_the_written_bytes(saved):
    file = saved[2] / "model.safetensors"
    se_inject.io.checkpoint_file.check_weights_digest(file)
    _, header = _header(file)
    assert len(header["__metadata__"][WEIGHTS_HASH_KEY]) == 64
    assert header["__metadata__"][WEIGHTS_HASH_KEY] != DIGEST_PLACEHOLDER


# --- fuzzing: only typed errors, nothing imported, no marker ----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from(EVIL_NAMES) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def fuzz_base(saved, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    marker = root / "pwned"
    file = payload(root / "code", marker)
    return saved[2], root, marker, file


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_plans_give_only_typed_errors(fuzz_base, data):
    good, root, marker, file = fuzz_base
    plan = json.loads(contents(good)[0][PLAN_KEY])
    plan["model"] = data.draw(st.sampled_from([plan["model"], {"source": "python", "name": f"{file}:build"},
                                               {"source": "python", "name": "os:getcwd"}]))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(plan))[1:]))
        parent = plan
        for part in path[:-1]:
            parent = parent[part]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    folder = craft(good, root / "f", lambda p: p.clear() or p.update(plan))
    with contextlib.suppress(CheckpointError):
        se_inject.load(folder)
    assert not marker.exists()
    assert "payload_se_inject_test" not in sys.modules


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**6), patch=st.binary(min_size=1, max_size=8), verify=st.booleans())
def test_fuzzed_headers_give_only_typed_errors(fuzz_base, position, patch, verify):
    good, root, marker, _ = fuzz_base
    raw = (good / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    at = position % (size + 8)
    (root / "h").mkdir(exist_ok=True)
    (root / "h" / "model.safetensors").write_bytes(raw[:at] + patch + raw[at + len(patch) :])
    with contextlib.suppress(CheckpointError):
        se_inject.load(root / "h", verify_weights=verify)
    assert not marker.exists()


# --- 5 and 6: all or nothing; only what se-inject wrote ---------------------------------------------------------------


def _run(seed: int) -> dict[str, bytes]:
    """A folder plain timm loads (`local-dir:`): test_resnet weights, its config, a report."""
    import io

    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save(state))
    config = json.dumps({"architecture": "test_resnet", "pretrained_cfg": {"license": f"run {seed}"}}).encode()
    return {"model.safetensors": buffer.getvalue(), "config.json": config, "report.json": b'{"seed": %d}' % seed}


def _writers(run: dict[str, bytes]):
    return {name: (lambda path, data=data: path.write_bytes(data)) for name, data in run.items()}


def _state(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("model.safetensors", "config.json", "report.json")}


# The steps of a write that change the file system; a fault is injected after any one of them.
STEPS = (("tempfile", "mkdtemp"), ("atomic", "create_new"), ("ownership", "create_new"), ("atomic", "_link"),
         ("atomic", "exchange"), ("atomic", "_move"), ("os", "rename"), ("os", "replace"), ("os", "unlink"),
         ("os", "rmdir"))


def _patch_steps(setattr_, after) -> None:
    """Wrap each step so that `after(name)` runs once it returned (`setattr_`: monkeypatch.setattr, or setattr in a
    forked child)."""
    for owner, name in STEPS:
        target = {"atomic": atomic, "ownership": ownership, "os": os, "tempfile": tempfile}[owner]
        real = getattr(target, name)

        def step(*args, _real=real, _name=f"{owner}.{name}", **kwargs):
            result = _real(*args, **kwargs)
            after(_name)
            return result

        setattr_(target, name, step)


def _write_killed_at(directory: Path, run: dict[str, bytes], step: int) -> None:
    """Write `run` in a forked child that dies (os._exit, no cleanup) right after its `step`-th step."""
    pid = os.fork()
    if pid == 0:  # the child: no test machinery, no cleanup, just dies
        calls = iter(range(10**6))

        def die(_name):
            if next(calls) == step:
                os._exit(9)

        _patch_steps(setattr, die)
        try:
            write_folder(directory, _writers(run), force=True, outputs=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 9)


def _steps(monkeypatch, write) -> list[str]:
    steps: list[str] = []
    with monkeypatch.context() as patch:
        _patch_steps(patch.setattr, steps.append)
        write()
    return steps


def test_killed_between_any_two_steps_leaves_one_complete_run(tmp_path, monkeypatch):
    from safetensors.torch import load as load_bytes

    old, new = _run(0), _run(1)
    out = tmp_path / "o"
    write_folder(out, _writers(old), outputs=True)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "x.txt").write_text("mine too")
    steps = _steps(monkeypatch, lambda: write_folder(out, _writers(new), force=True, outputs=True))
    assert "atomic.exchange" in steps and "atomic._move" in steps, steps  # swapped, then the user's folder moved over
    for step, name in enumerate(steps):
        out = tmp_path / f"k{step}"
        write_folder(out, _writers(old), outputs=True)
        (out / "notes.txt").write_text("mine")
        (out / "data").mkdir()
        (out / "data" / "x.txt").write_text("mine too")
        lookalike = f".se-inject-{'a' * 32}"  # the user's folder, named like a temporary: theirs all the same
        (out / lookalike).mkdir()
        (out / lookalike / "precious").write_text("mine")
        inodes = {p: os.lstat(out / p).st_ino for p in ("notes.txt", "data", "data/x.txt", f"{lookalike}/precious")}
        _write_killed_at(out, new, step)
        state = _state(out)
        assert state in (old, new), f"killed after step {step} ({name}): a mixed folder"
        assert (out / "notes.txt").read_text() == "mine"
        model = timm.create_model(f"local-dir:{out}", pretrained=True)  # plain timm loads whichever run it holds
        assert torch.equal(model.state_dict()["fc.weight"], load_bytes(state["model.safetensors"])["fc.weight"])
        write_folder(out, _writers(new), force=True, outputs=True)  # the next run completes and cleans up
        assert _state(out) == new and (out / "notes.txt").read_text() == "mine"
        assert (out / "data" / "x.txt").read_text() == "mine too", f"killed after step {step} ({name})"
        assert {p: os.lstat(out / p).st_ino for p in inodes} == inodes  # the user's entries are the same ones
        assert sorted(p.name for p in out.iterdir()) == [".se-inject-" + "a" * 32, ".se-inject.json", "config.json",
                                                         "data", "model.safetensors", "notes.txt", "report.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers next to the folders


def test_killed_first_write_leaves_no_folder_or_a_complete_one(tmp_path, monkeypatch):
    run = _run(0)
    steps = _steps(monkeypatch, lambda: write_folder(tmp_path / "o", _writers(run), outputs=True))
    assert steps
    for step, name in enumerate(steps):
        out = tmp_path / f"k{step}"
        _write_killed_at(out, run, step)
        assert not out.exists() or _state(out) == run, f"killed after {name!r}"
        write_folder(out, _writers(run), force=True, outputs=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_touches_only_what_se_inject_wrote(tmp_path):
    out = tmp_path / "o"
    run = _run(0)
    write_folder(out, {**_writers(run), "model.onnx": lambda p: p.write_bytes(b"ours")}, outputs=True)
    (out / "model.onnx").unlink()
    (out / "model.onnx").write_bytes(b"the user's own")  # replaced by the user: theirs now
    (out / "report.json").write_bytes(b"edited by the user")  # ours, changed by the user: theirs now
    lookalikes = [out / ".model.tmp-1-abc", tmp_path / ".o.tmp-1-abc", tmp_path / ".se-inject-notes",
                  out / ".se-inject-staging-notes"]
    for path in lookalikes:
        path.write_text("a user's file")
    (tmp_path / ".o.tmp-2-dir").mkdir()
    write_folder(out, {"model.safetensors": _writers(run)["model.safetensors"]}, force=True, outputs=True)
    assert (out / "model.onnx").read_bytes() == b"the user's own"
    assert (out / "report.json").read_bytes() == b"edited by the user"
    assert not (out / "config.json").exists()  # ours and unchanged: stale, removed
    assert all(p.read_text() == "a user's file" for p in lookalikes) and (tmp_path / ".o.tmp-2-dir").is_dir()


def test_without_force_a_recorded_output_blocks_the_write(tmp_path):
    out = tmp_path / "o"
    write_folder(out, {"model.onnx": lambda p: p.write_bytes(b"ours")}, outputs=True)
    with pytest.raises(se_inject.OutputExistsError, match=r"model\.onnx"):
        write_folder(out, {"model.safetensors": lambda p: p.write_bytes(b"x")}, outputs=True)


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    out = tmp_path / "o"
    write_folder(out, {"a.txt": lambda p: p.write_text("1")}, outputs=True)

    def write_while_another_run_starts(path: Path) -> None:
        path.write_text("2")
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".se-inject-")]
        assert len(live) == 1  # our own staging folder, locked
        atomic.remove_leftovers(out)  # what a concurrent run does first
        assert live[0].is_dir()

    write_folder(out, {"a.txt": write_while_another_run_starts}, force=True, outputs=True)
    assert (out / "a.txt").read_text() == "2"


# --- 7. the remaining bad inputs: one line, exit 1 or 2 --------------------------------------------------------------


def one_line(result, code: int, *texts: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]


def cli(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "300"})


def test_deeply_nested_recipe_file(tmp_path):
    recipe = tmp_path / "deep.toml"
    recipe.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line(cli("timm:test_resnet", "--dry-run", "--recipe-file", str(recipe)), 2, "nested too deeply")


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_seed_outside_the_rng_range(tmp_path, seed, dry_run):
    args = ["timm:test_resnet", "--seed", seed, "-o", str(tmp_path / "o"), *(["--dry-run"] if dry_run else [])]
    one_line(cli(*args), 2, "invalid seed")
    assert not (tmp_path / "o").exists()
    assert cli("timm:test_resnet", "--dry-run", "--seed", str(2**64 - 1)).exit_code == 0


def test_input_size_no_machine_can_hold(tmp_path, monkeypatch):
    one_line(cli("timm:test_resnet", "--input-size", "3,16385,16", "-o", str(tmp_path / "o")), 2, "at most 16384")
    import se_inject.engine.memory

    monkeypatch.setattr(se_inject.engine.memory, "machine_memory", lambda: 2**30)  # a 1 GiB machine
    one_line(cli("timm:test_resnet", "--input-size", "4096", "-o", str(tmp_path / "o")), 2, "GiB, more than")
    assert not (tmp_path / "o").exists()
    # A dry run verifies each rewrite on real tensors of its block's input size: the same guard
    one_line(cli("timm:test_resnet", "--input-size", "4096", "--dry-run"), 2, "GiB, more than")
    monkeypatch.setattr(se_inject.engine.memory, "machine_memory", lambda: 2**40)
    assert cli("timm:test_resnet", "--input-size", "1100", "--dry-run").exit_code == 0


def test_unreadable_files_say_permission_denied(saved, tmp_path, monkeypatch):
    import builtins

    import se_inject.engine.weights

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # what open() does for a file without read permission (root reads all)
        if str(file) in (str(weights), str(saved[2] / "model.safetensors")):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    real_os_open = os.open

    def os_denied(file, *args, **kwargs):  # the --weights file is opened with os.open (engine.files)
        if str(file) == str(weights):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(se_inject.engine.weights, "open", denied, raising=False)
    monkeypatch.setattr(os, "open", os_denied)
    one_line(cli("timm:test_resnet", "--weights", str(weights), "--dry-run"), 1, "permission denied")
    one_line(cli("export", str(saved[2]), "-f", "onnx"), 1, "permission denied")


def test_non_utf8_output_path_is_refused(tmp_path):
    out = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    one_line(cli("timm:test_resnet", "-o", out), 2, "not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


def test_printing_under_an_ascii_terminal(tmp_path, monkeypatch):
    import io

    from se_inject.cli.process import printable_streams
    from se_inject.cli.render import render_report

    _, report = se_inject.inject("timm:test_resnet", seed=0, device="meta")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    printable_streams()
    render_report(report.__class__(**{**vars(report), "output": str(tmp_path / "é")}))
    stdout.flush()
    assert b"saved to" in stdout.buffer.getvalue() and b"\\xe9" in stdout.buffer.getvalue()


class SystemCall:
    """Unpickling this would run a shell command (the harmless target creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_os_system_pickle_is_refused_naming_the_callable(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": SystemCall(marker)}, tmp_path / "evil.pth")
    result = cli("timm:test_resnet", "--weights", str(tmp_path / "evil.pth"), "--dry-run")
    one_line(result, 1, "refused, loading it would call", f"{os.system.__module__}.system")
    assert not marker.exists()


# --- 8. reproducible reports ---------------------------------------------------------------------------------------


def test_seeded_report_is_byte_identical_across_thread_counts(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)  # weights: the drift is measured
    reports, threads = [], torch.get_num_threads()
    try:
        for n in (2, 1):  # what OMP_NUM_THREADS=2 / =1 set
            torch.set_num_threads(n)
            _, report = se_inject.inject("timm:test_efficientnet", se_inject.Settings(fill=True), seed=3,
                                         weights=weights)
            reports.append(json.dumps(report.to_dict(), indent=2))
    finally:
        torch.set_num_threads(threads)
    assert json.loads(reports[0])["drift"]["max_abs_diff"] > 0
    assert reports[0] == reports[1]


def test_without_an_atomic_swap_files_are_replaced_one_by_one(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda _a, _b: False)  # another OS, a mount point, the cwd
    out = tmp_path / "o"
    write_folder(out, _writers(_run(0)), outputs=True)
    (out / "notes.txt").write_text("mine")
    write_folder(out, _writers(_run(1)), force=True, outputs=True)
    assert _state(out) == _run(1) and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert sorted(p.name for p in out.iterdir()) == [".se-inject.json", "config.json", "model.safetensors",
                                                     "notes.txt", "report.json"]
