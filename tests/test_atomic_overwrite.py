"""Overwriting an output folder is all or nothing: a writer that fails midway leaves the previous output whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_security import _run, _state, _steps, _write_killed_at, _writers

import se_inject
from se_inject.io.atomic import write_folder
from se_inject.io.ownership import RECORD_FILE, RECORD_FORMAT


class Unserialisable:
    pass


def test_a_failing_writer_leaves_the_previous_output_whole(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path / "out"
    se_inject.save(model, report, directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other, other_report = se_inject.inject("timm:test_resnet", seed=2)
    # The weights are written first, then the report's writer fails: nothing of the new output may land.
    with pytest.raises(TypeError):
        se_inject.save(other, replace(other_report, notes=(Unserialisable(),)), directory, force=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # same files, same bytes, no temporaries
    loaded = se_inject.load(directory)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# --- the rule, from every side: se-inject removes or replaces only what it can prove it wrote ---------------------


OLD, NEW = _run(0), _run(1)


def _tree(path: Path) -> dict[str, tuple]:
    """Every entry under `path` (not crossing into mounts' parents): kind, inode and bytes (files) or target."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(root) / name
            st = os.lstat(entry)
            kind = st.st_mode & 0o170000
            data = entry.read_bytes() if kind == 0o100000 else os.readlink(entry) if kind == 0o120000 else None
            found[str(entry.relative_to(path))] = (kind, st.st_ino, data)
    return found


@contextlib.contextmanager
def mounted(*args: str, target: Path):
    """`mount ARGS TARGET` for the block; skips where mounting is not permitted."""
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _dataset(tmp_path: Path) -> Path:
    source = tmp_path / "dataset"
    (source / "train").mkdir(parents=True)
    (source / "train" / "0.jpg").write_bytes(b"an image")
    (source / "labels.csv").write_text("0,cat\n")
    return source


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
def test_a_mount_point_in_the_output_folder_is_never_descended_into(tmp_path, kind):
    out = tmp_path / "project"
    write_folder(out, _writers(OLD), outputs=True)
    (out / "data").mkdir()
    source = _dataset(tmp_path)
    args = ["--bind", str(source)] if kind == "bind" else ["-t", "tmpfs", "tmpfs"]
    with mounted(*args, target=out / "data"):
        if kind == "tmpfs":
            (out / "data" / "labels.csv").write_text("0,cat\n")
        inside = _tree(out / "data")
        before = _tree(source)
        write_folder(out, _writers(NEW), outputs=True, force=True)
        assert _state(out) == NEW
        assert _tree(out / "data") == inside  # still mounted, every entry the same
        assert os.path.ismount(out / "data") or kind == "bind"
    assert _tree(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "project"]  # no leftovers


def test_an_output_folder_that_is_a_mount_point(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with mounted("-t", "tmpfs", "tmpfs", target=out):
        write_folder(out, _writers(OLD), outputs=True)
        (out / "notes.txt").write_text("mine")
        write_folder(out, _writers(NEW), outputs=True, force=True)
        assert _state(out) == NEW and (out / "notes.txt").read_text() == "mine"
        assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE, "config.json", "model.safetensors",
                                                         "notes.txt", "report.json"]


def _stamp(path: Path) -> dict[str, int]:
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@pytest.mark.parametrize("kind", ["folder", "symlinked folder", "hard link", "symlink", "fifo"])
@pytest.mark.parametrize("force", [False, True])
def test_a_crafted_record_naming_a_users_entry_never_removes_it(tmp_path, kind, force):
    """A `.se-inject.json` that claims the user's entry as se-inject's (with the entry's own size and mtime)."""
    out = tmp_path / "o"
    if force:  # an output folder
        write_folder(out, _writers(OLD), outputs=True)
    else:  # the user's project folder, with a record naming only their entry: a plain run writes into it
        out.mkdir()
        (out / RECORD_FILE).write_text(json.dumps({"format": RECORD_FORMAT, "files": {}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("precious")
    name = "data"
    if kind == "folder":
        (out / name).mkdir()
        (out / name / "x.txt").write_text("precious")
    elif kind == "symlinked folder":
        (out / name).symlink_to(elsewhere, target_is_directory=True)
    elif kind == "hard link":
        os.link(elsewhere / "x.txt", out / name)
    elif kind == "symlink":
        (out / name).symlink_to(elsewhere / "x.txt")
    else:
        os.mkfifo(out / name)
    record = json.loads((out / RECORD_FILE).read_text())
    digest = hashlib.sha256((elsewhere / "x.txt").read_bytes()).hexdigest() if kind == "hard link" else "0" * 64
    record["files"][name] = {**_stamp(out / name), "sha256": digest}
    (out / RECORD_FILE).write_text(json.dumps(record))
    before, outside = _tree(out), _tree(elsewhere)
    if kind == "hard link":  # every byte matches: it is a copy of what se-inject would have written, ...
        if not force:
            with pytest.raises(se_inject.OutputExistsError, match=r"pass force=True \(--force\)"):
                write_folder(out, _writers(NEW), outputs=True)
            return
        write_folder(out, _writers(NEW), outputs=True, force=True)
        assert _tree(elsewhere) == outside  # ... and removing that name loses nothing: the bytes live on elsewhere
        return
    write_folder(out, _writers(NEW), outputs=True, force=force)
    assert _state(out) == NEW
    after = _tree(out)
    assert {k: after.get(k) for k in before if k.split("/")[0] == name} == {
        k: v for k, v in before.items() if k.split("/")[0] == name}
    assert _tree(elsewhere) == outside


def test_a_file_changed_with_its_size_and_mtime_kept_is_the_users(tmp_path):
    out = tmp_path / "o"
    write_folder(out, _writers(OLD), outputs=True)
    stamp = os.stat(out / "report.json")
    (out / "report.json").write_bytes(b"X" * stamp.st_size)  # edited in place, then its mtime put back
    os.utime(out / "report.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(se_inject.OutputExistsError, match="not a file se-inject wrote"):
        write_folder(out, _writers(NEW), outputs=True, force=True)
    assert (out / "report.json").read_bytes() == b"X" * stamp.st_size


def test_hard_links_keep_their_bytes(tmp_path):
    out = tmp_path / "o"
    write_folder(out, _writers(OLD), outputs=True)
    os.link(out / "model.safetensors", tmp_path / "backup.safetensors")  # the user's backup of se-inject's file
    os.link(tmp_path / "backup.safetensors", out / "mine.safetensors")
    write_folder(out, _writers(NEW), outputs=True, force=True)
    assert (tmp_path / "backup.safetensors").read_bytes() == OLD["model.safetensors"]  # replaced, never written into
    assert os.lstat(out / "mine.safetensors").st_ino == os.lstat(tmp_path / "backup.safetensors").st_ino
    assert _state(out) == NEW


def _prepare(out: Path) -> dict[str, int]:
    write_folder(out, _writers(OLD), outputs=True)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "x.txt").write_text("mine too")
    return {p: os.lstat(out / p).st_ino for p in ("notes.txt", "data", "data/x.txt")}


def _anywhere(root: Path, inode: int) -> list[Path]:
    return [Path(r) / n for r, ds, fs in os.walk(root) for n in ds + fs if os.lstat(Path(r) / n).st_ino == inode]


def test_killed_at_any_step_then_the_user_recreates_the_folder(tmp_path, monkeypatch):
    """After a kill, the user makes `data/` again where it went missing; the next run never removes the original:
    either it puts it back, or it stops naming where it is."""
    steps = _steps(monkeypatch, lambda: (_prepare(tmp_path / "dry"),
                                         write_folder(tmp_path / "dry", _writers(NEW), force=True, outputs=True)))
    for step, name in enumerate(steps):
        root = tmp_path / f"k{step}"
        root.mkdir()
        out = root / "o"
        inodes = _prepare(out)
        _write_killed_at(out, NEW, step)
        if not (out / "data").exists():
            (out / "data").mkdir()
            (out / "data" / "x.txt").write_text("made again")
        with contextlib.suppress(se_inject.SEInjectError):  # "could not be put back ... they are in ..."
            write_folder(out, _writers(NEW), force=True, outputs=True)
        for path, inode in inodes.items():
            found = _anywhere(root, inode)
            assert found, f"killed after step {step} ({name}): {path} lost"
            if path.endswith(".txt"):
                assert found[0].read_text() in ("mine", "mine too"), (step, name)
