"""Hostile and unusual inputs: a typed error in bounded time and memory, and the user's own files never touched.

One test (or parameter) per vector: crafted folders whose checksums are recomputed as an attacker would (see
`test_security.craft`), FIFOs and symlinks with se-inject's temporary naming, decompression bombs, a broken
torch/torchvision pair; and hypothesis fuzzing of the plan's place fields and of the output folder's contents.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security import _run, _writers, contents, craft, one_line, payload, set_model
from typer.testing import CliRunner

import se_inject
from se_inject import CheckpointError, OutputExistsError, SurgeryError
from se_inject.cli.commands import app
from se_inject.engine.plan import Plan, Site
from se_inject.engine.schema import MAX_SITES_PER_BLOCK
from se_inject.engine.surgery import apply_plan
from se_inject.io.atomic import foreign_entries, write_folder
from se_inject.io.checkpoint import PLAN_KEY
from se_inject.io.ownership import RECORD_FILE

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "300"})


def within(seconds: float, fn, *args, **kwargs):
    """`fn(*args)` in a thread; fails the test (instead of hanging it) when it takes longer than `seconds`."""
    result: dict[str, object] = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s (blocked?)"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path_factory.mktemp("good") / "out"
    se_inject.save(model, report, directory)
    return directory


def rewrite(anchor: str, position: str = "after", name: str = "attn"):
    """The first site as a forward rewrite (no slot) at `anchor`."""
    def edit(plan):
        plan["sites"][0].update(slot=None, name=name, anchor=anchor, position=position)

    return edit


def set_attention(field: str, value):
    def edit(plan):
        plan["sites"][0]["attention"][field] = value

    return edit


# --- 1. typed errors where a traceback-class failure was ------------------------------------------------------------


@pytest.mark.parametrize(("edit", "field"), [
    (rewrite("nope.bn2"), "sites[0].anchor"),  # a missing child
    (rewrite("downsample.0"), "sites[0].anchor"),  # a child that is None in this block
    (rewrite("self.x"), "sites[0].anchor"),
    (rewrite("%x", "before"), "sites[0].position"),  # a graph node: SE only takes its output
    (set_attention("gain", 10**400), "sites[0].attention.gain"),  # no float holds it
    (set_attention("host_gain", -(10**400)), "sites[0].attention.host_gain"),
    (set_attention("rd_channels", 2**20), "sites[0].attention.rd_channels"),  # wider than its site allows
    (lambda p: p["sites"][0].update(path="layer1.0.bn2", block="torch.nn.modules.batchnorm.BatchNorm2d", anchor="",
                                    slot=None, name="se_inject_forward"), "sites[0].name"),  # the wrapper's method
    (set_model("timm", "test_resnet.any_tag"), "model.name"),  # a tag timm does not have
    (set_model("torchvision", "resnet18.NO_SUCH_WEIGHTS"), "model.name"),
    (lambda p: p.update(sites=[{**p["sites"][0], "name": f"attn{i}", "slot": None}
                               for i in range(MAX_SITES_PER_BLOCK + 1)]), f"sites[{MAX_SITES_PER_BLOCK}].path"),
])
def test_crafted_plans_give_a_typed_error_naming_the_field(good, tmp_path, edit, field):
    folder = craft(good, tmp_path / "f", edit)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(field)):
        se_inject.load(folder)
    assert time.perf_counter() - start < 30
    one_line(cli("export", str(folder), "-f", "torchscript"), 1, field)
    assert not (folder / "model.pt").exists()


def test_a_tag_timm_has_still_loads(good, tmp_path):
    folder = craft(good, tmp_path / "f", set_model("timm", "test_resnet.r160_in1k"))
    assert isinstance(se_inject.load(folder), torch.nn.Module)


def test_the_wrappers_method_name_never_reaches_the_rewrite(good):
    plan = se_inject.read_plan(good)
    site = plan.sites[0]
    evil = Plan(plan.model, (Site(f"{site.path}.bn2", site.recipe, "torch.nn.modules.batchnorm.BatchNorm2d", "",
                                  "after", None, "se_inject_forward", site.attention),), plan.input_size)
    with pytest.raises(SurgeryError, match="se_inject"):
        apply_plan(timm.create_model("test_resnet").to("meta"), evil)


def test_deep_versions_entry_with_an_unknown_model(good, tmp_path):
    """The folder's record of library versions is read only for the message; 100,000 levels deep it is unknown."""
    from safetensors.torch import save_file

    metadata, tensors = contents(craft(good, tmp_path / "c", set_model("timm", "no_such_model_here")))
    metadata["se_inject.versions"] = "[" * 100_000 + "]" * 100_000
    (tmp_path / "f").mkdir()
    save_file(tensors, str(tmp_path / "f" / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"model\.name.*another version"):
        se_inject.load(tmp_path / "f", verify_weights=False)


# --- 2. bounded time and memory ---------------------------------------------------------------------------------------


def test_nothing_real_is_allocated_for_a_plan_that_does_not_fit(good, tmp_path, monkeypatch):
    """Widths the schema allows but the weights do not have: refused from the meta build, no real build at all."""
    import se_inject.io.checkpoint as checkpoint

    builds = []
    real_build = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda spec, **kw: builds.append(kw) or real_build(spec, **kw))
    folder = craft(good, tmp_path / "f", lambda p: [s["attention"].update(rd_channels=1024) for s in p["sites"]])
    with pytest.raises(CheckpointError, match="shape mismatches"):
        se_inject.load(folder)
    assert builds and all(kw.get("device") == "meta" for kw in builds)
    user_model = timm.create_model("test_resnet")
    before = {k: v.clone() for k, v in user_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        se_inject.load(folder, model=user_model)  # the caller's model: checked on a meta copy, left as it was
    assert user_model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in user_model.state_dict().items())


MEMORY_CASE = """
import re, resource, sys
from pathlib import Path
import se_inject, se_inject.engine.drift, torch
se_inject.inject("timm:test_resnet", seed=0, device="meta")  # imports done: measure from here
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {limit_mb} * 2**20, resource.RLIM_INFINITY))
{body}
"""


def under_memory_limit(body: str, limit_mb: int = 384) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter whose address space may grow by at most `limit_mb` after the imports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", MEMORY_CASE.format(limit_mb=limit_mb, body=body)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def png_bomb(path: Path, side: int) -> None:
    """A valid grayscale PNG of side x side pixels, all zero: a few hundred KB that decode to side**2 bytes and more."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_decompression_bomb_is_skipped_with_a_note_under_a_memory_limit(tmp_path):
    from torchvision.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    png_bomb(images / "bomb.png", 10_000)  # 100 M pixels, above Pillow's limit: 300 MB as RGB before resizing
    assert (images / "bomb.png").stat().st_size < 1_000_000
    write_png(torch.zeros(3, 40, 50, dtype=torch.uint8), str(images / "ok.png"))
    result = under_memory_limit(f"x, text = se_inject.engine.drift.image_batch({str(images)!r}, (3, 32, 32))\n"
                                "print(tuple(x.shape), text)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 3, 32, 32)" in result.stdout
    assert "bomb.png (10000x10000 pixels, more than" in result.stdout


def test_image_limit_follows_pillows(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision.io import write_png

    (tmp_path / "i").mkdir()
    for i in range(2):
        write_png(torch.zeros(3, 40, 50, dtype=torch.uint8), str(tmp_path / "i" / f"{i}.png"))
    os.mkfifo(tmp_path / "i" / "fifo.png")  # an image's name, not a file: skipped, never opened
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1999)
    from se_inject.engine.drift import image_batch

    with pytest.raises(se_inject.SEInjectError, match="none of the 3 files decodes"):
        within(60, image_batch, tmp_path / "i", (3, 32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    x, text = within(60, image_batch, tmp_path / "i", (3, 32, 32))
    assert x.shape[0] == 2 and "fifo.png" in text


@pytest.mark.slow
def test_crafted_widths_stay_within_memory(good, tmp_path):
    """The attack's plan (2^20 squeeze channels on every site) exits 1 without allocating it."""
    folder = craft(good, tmp_path / "f", lambda p: [s["attention"].update(rd_channels=2**20) for s in p["sites"]])
    body = ("from typer.testing import CliRunner\nfrom se_inject.cli.commands import app\n"
            f"r = CliRunner().invoke(app, ['export', {str(folder)!r}, '-f', 'torchscript'])\n"
            "print(r.exit_code, r.stderr)")
    result = under_memory_limit(body)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("1 ") and "rd_channels" in result.stdout


def test_sites_per_block_are_refused_before_any_work(good, tmp_path):
    too_many = [{"name": f"attn{i}", "slot": None} for i in range(400)]
    folder = craft(good, tmp_path / "f", lambda p: p.update(sites=[{**p["sites"][0], **s} for s in too_many]))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"more than {MAX_SITES_PER_BLOCK} sites"):
        se_inject.load(folder)
    assert time.perf_counter() - start < 10  # 400 sites on one block took 74 s to replay


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["staging marker inside the folder", "temporary in the parent",
                                   "staging marker in the folder", "record file"])
def test_fifos_with_our_naming_never_block_a_run(tmp_path, where):
    out = tmp_path / "o"
    write_folder(out, _writers(_run(0)), outputs=True)
    token = secrets.token_hex(16)
    if where == "staging marker inside the folder":
        (out / f".se-inject-{token}").mkdir()
        fifo = _fifo(out / f".se-inject-{token}" / ".se-inject-staging")
    elif where == "temporary in the parent":
        fifo = _fifo(tmp_path / f".se-inject-{token}")
    elif where == "staging marker in the folder":
        fifo = _fifo(out / ".se-inject-staging")
    else:
        (out / RECORD_FILE).unlink()
        fifo = _fifo(out / RECORD_FILE)
    if where == "staging marker in the folder":  # the run needs that name: refused, naming it
        with pytest.raises(OutputExistsError, match="staging"):
            within(60, write_folder, out, _writers(_run(1)), force=True, outputs=True)
    elif where == "record file":  # no valid record: nothing in the folder is se-inject's, so nothing is replaced
        with pytest.raises(OutputExistsError, match="not a file se-inject wrote"):
            within(60, write_folder, out, _writers(_run(1)), force=True, outputs=True)
    else:
        reported = fifo.parent if where == "staging marker inside the folder" else fifo  # a folder without our marker
        assert str(reported) in foreign_entries(out)
        within(60, write_folder, out, _writers(_run(1)), force=True, outputs=True)
        within(60, write_folder, tmp_path / "new", _writers(_run(1)), outputs=True)  # a new folder beside it
        assert (out / "report.json").read_bytes() == _run(1)["report.json"]
    assert os.path.lexists(fifo) and os.lstat(fifo).st_mode & 0o170000 == 0o010000  # still the FIFO, untouched


def test_cli_notes_foreign_entries_and_finishes(tmp_path):
    out = tmp_path / "o"
    (tmp_path / "o").mkdir()
    fifo = _fifo(out / f".se-inject-{secrets.token_hex(16)}")
    result = within(120, cli, "timm:test_resnet", "-o", str(out), "--seed", "0", "--json", "--input-size", "32")
    assert result.exit_code == 0, result.stderr
    assert any("left alone" in n and fifo.name in n for n in json.loads(result.stdout)["notes"])
    exported = within(120, cli, "export", str(out), "-f", "torchscript")
    assert exported.exit_code == 0, exported.stderr
    assert os.path.lexists(fifo)


# --- 3. the user's files in the output folder ---------------------------------------------------------------------


def _snapshot(path: Path) -> dict[str, tuple]:
    """Every entry under `path`: type, inode, owner, and content (files) or target (symlinks)."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(root) / name
            st = os.lstat(entry)
            kind = st.st_mode & 0o170000
            data = entry.read_bytes() if kind == 0o100000 else os.readlink(entry) if kind == 0o120000 else None
            found[str(entry.relative_to(path))] = (kind, st.st_ino, st.st_uid, data)
    return found


def test_user_entries_with_our_naming_survive(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / f".se-inject-{secrets.token_hex(16)}").mkdir()  # a folder of the user's, no marker
    (next(out.iterdir()) / "precious.txt").write_text("mine")
    held = out / f".se-inject-{secrets.token_hex(16)}.tmp"  # a live process's file, locked
    held.write_text("in use")
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("mine too")
    before = _snapshot(out)
    try:
        result = cli("timm:test_resnet", "-o", str(out), "--seed", "0", "--input-size", "32")
        assert result.exit_code == 0, result.stderr
        result = cli("timm:test_resnet", "-o", str(out), "--seed", "1", "--input-size", "32", "--force")
        assert result.exit_code == 0, result.stderr
    finally:
        os.close(fd)
    after = _snapshot(out)
    assert {k: after.get(k) for k in before} == before  # same bytes, same inodes, same owners
    assert {"model.safetensors", "report.json", RECORD_FILE} <= set(after)


def test_force_never_replaces_a_file_se_inject_did_not_write(tmp_path):
    out = tmp_path / "o"
    assert cli("timm:test_resnet", "-o", str(out), "--seed", "0", "--input-size", "32").exit_code == 0
    (out / "model.pt").write_bytes(b"the user's own TorchScript")
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "mine": "hand-edited"}))
    before = _snapshot(out)
    result = cli("timm:test_resnet", "-o", str(out), "--seed", "1", "--input-size", "32", "--force",
                 "--export", "torchscript")
    one_line(result, 1, "not a file se-inject wrote")
    exported = cli("export", str(out), "-f", "torchscript", "--force")
    one_line(exported, 1, "model.pt")
    assert _snapshot(out) == before
    (out / "model.pt").unlink()  # the user moves theirs away: now it works, and report.json is still theirs
    assert cli("export", str(out), "-f", "torchscript").exit_code == 0
    assert json.loads((out / "report.json").read_text())["mine"] == "hand-edited"


# --- 5. the newcomer's path -----------------------------------------------------------------------------------------


def test_a_broken_torch_torchvision_pair_is_an_environment_error(tmp_path):
    from importlib.metadata import version

    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)  # what torchvision's import does when its C++ operators were built for another torch
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "se_inject", "timm:test_resnet", "--dry-run"], capture_output=True,
                            text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0]
    assert f"torch {version('torch')}" in lines[0] and f"torchvision {version('torchvision')}" in lines[0]
    assert "pip install" in lines[0] and "torchvision::nms" in lines[0]


def test_option_values_are_checked_before_torch_is_imported():
    cases = [["timm:test_resnet", "--attention", "foo"], ["timm:test_resnet", "--gate", "tanh"],
             ["timm:test_resnet", "--init", "zeros"], ["timm:test_resnet", "--divisor", "4096"],
             ["timm:test_resnet", "--reduction", "0"], ["compare", "timm:test_resnet", "--attention", "foo"]]
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom se_inject.cli.commands import app\n"
            f"for args in {cases!r}:\n"
            "    r = CliRunner().invoke(app, args)\n"
            "    print(r.exit_code, r.stderr.count(chr(10)))\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.split() == ["2", "1"] * len(cases) + ["False"], result.stderr[-2000:]


def test_a_transformer_no_recipe_takes_is_told_why(tmp_path):
    from helpers import parallel_vit, parallel_vit_factory

    from se_inject.engine.category import architecture_category

    assert architecture_category(parallel_vit()) == "transformer"  # as scan says
    one_line(cli(parallel_vit_factory(tmp_path), "--dry-run", "--input-size", "32"), 1,
             "transformer with no convolutional block")


# --- 6. fuzzing -----------------------------------------------------------------------------------------------------

ANCHORS = st.sampled_from(["bn2", "conv2", "bn1", "act1", "", "%x", "%add", "nope", "nope.bn2", "downsample",
                           "downsample.0", "self.x", "conv1.weight", "bn2.-1", "0", "-1", "se.fc1"])
NUMBERS = st.one_of(st.integers(-(10**400), 10**400), st.sampled_from([10**400, -(10**400), 0, 1, 2**63]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=4))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-places")
    marker = root / "pwned"
    return root, marker, payload(root / "code", marker)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anchor=ANCHORS, position=st.sampled_from(["after", "before", "inside", ""]),
       slot=st.sampled_from([None, "se", "attn", "bn2", "se_inject_forward", "forward", "__init__"]),
       gain=NUMBERS, host_gain=NUMBERS, index=st.integers(0, 3))
def test_fuzzed_places_and_gains_give_only_typed_errors(good, fuzz_root, anchor, position, slot, gain, host_gain,
                                                        index):
    root, marker, _ = fuzz_root

    def edit(plan):
        site = plan["sites"][index % len(plan["sites"])]
        site.update(anchor=anchor, position=position, slot=slot, name=slot or "attn")
        site["attention"].update(gain=gain, host_gain=host_gain)

    folder = craft(good, root / "f", edit)
    with contextlib.suppress(CheckpointError):
        se_inject.load(folder)
    assert not marker.exists()


USER_ENTRIES = st.lists(st.sampled_from(["file", "dir", "symlink", "fifo", "our-name-dir", "our-name-file",
                                         "dead-temp", "live-temp", "model.onnx", "notes.txt"]), max_size=6)


def _make_entry(out: Path, kind: str, i: int, held: list[int]) -> None:
    token = secrets.token_hex(16)
    if kind == "file":
        (out / f"mine{i}.bin").write_bytes(os.urandom(16))
    elif kind == "dir":
        (out / f"dir{i}").mkdir()
        (out / f"dir{i}" / "x").write_text(str(i))
    elif kind == "symlink":
        os.symlink("/etc/passwd", out / f"link{i}")
    elif kind == "fifo":
        os.mkfifo(out / f"fifo{i}")
    elif kind == "our-name-dir":
        (out / f".se-inject-{token}").mkdir()
        (out / f".se-inject-{token}" / "precious").write_text("mine")
    elif kind == "our-name-file":  # our naming, not our shape: a FIFO
        os.mkfifo(out / f".se-inject-{token}.tmp")
    elif kind in ("dead-temp", "live-temp"):  # a temporary of an export into this folder
        path = out / f".se-inject-{token}.tmp.pt"
        path.write_bytes(b"partial")
        if kind == "live-temp":
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
    elif not os.path.lexists(out / kind):
        (out / kind).write_bytes(b"the user's " + kind.encode())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=USER_ENTRIES, first=st.booleans(), force=st.booleans())
def test_fuzzed_output_folders_keep_every_user_entry(tmp_path, entries, first, force):
    """After any run, every user entry is as it was (bytes, inode, owner) and se-inject's files are one complete run:
    the old one (when the run is refused) or the new one."""
    out = tmp_path / f"o{secrets.token_hex(4)}"
    old, new = _run(0), _run(1)
    if first:
        write_folder(out, _writers(old), outputs=True)
    out.mkdir(exist_ok=True)
    held: list[int] = []
    try:
        for i, kind in enumerate(entries):
            _make_entry(out, kind, i, held)
        dead = [p.name for p in out.iterdir() if p.name.endswith(".tmp.pt") and not _locked(p)]
        user = {k: v for k, v in _snapshot(out).items() if k.split("/")[0] not in (*old, RECORD_FILE, *dead)}
        refused = False
        try:
            within(60, write_folder, out, _writers(new), force=force, outputs=True)
        except OutputExistsError:
            refused = True
        after = _snapshot(out)
        assert {k: after.get(k) for k in user} == user
        ours = {name: (out / name).read_bytes() for name in new if (out / name).is_file()}
        assert refused == (first and not force)
        assert ours == ((old if first else {}) if refused else new)
    finally:
        for fd in held:
            os.close(fd)


def _locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def test_plan_text_is_the_one_the_fuzzers_edit(good):
    assert json.loads(contents(good)[0][PLAN_KEY])["sites"][0]["slot"] == "se"  # the fixture is a slot plan
