"""The tool's own cost, measured against floors that do only the unavoidable work.

- ``se-inject resnet50 -r 16 -o DIR`` vs a floor that imports timm, builds resnet50 and saves its state_dict with
  safetensors (target: <= 1.25x);
- ``se-inject --help`` / ``--version`` / ``recipes`` vs ``python -c "import typer"`` (target: <= 1.5x);
- refusals that need no model (existing output, ``-o`` naming a file, an unknown ``--export`` format), answered
  before torch is imported: target under 1 s (shown beside the same floor; typer's option parsing, which the
  listings skip, costs about 0.2 s of the difference).

Runs are paired and interleaved (floor, tool, floor, tool, ...) so drift hits both sides; medians and ratios are
printed. Usage: ``python benchmarks/bench_cli.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import sys, timm
from safetensors.torch import save_file
model = timm.create_model("resnet50")
save_file(model.state_dict(), sys.argv[1] + "/model.safetensors")
"""


def timed(cmd: list[str], expect: int = 0) -> float:
    start = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    elapsed = time.perf_counter() - start
    if code != expect:
        sys.exit(f"{' '.join(cmd)}: exit {code}, expected {expect}")
    return elapsed


def paired(floor: list[str], tool: list[str], repeats: int, setup=lambda: None,
           expect: int = 0) -> tuple[float, float, list[float]]:
    setup()
    timed(floor)  # warm the file cache
    setup()
    timed(tool, expect)
    floors, tools, ratios = [], [], []
    for _ in range(repeats):
        setup()
        a = timed(floor)
        setup()
        b = timed(tool, expect)
        floors.append(a), tools.append(b), ratios.append(b / a)
    return statistics.median(floors), statistics.median(tools), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    # The console script next to this interpreter (a pyenv shim on PATH would add its own start-up to every run).
    beside = Path(sys.executable).parent / "se-inject"
    exe = str(beside) if beside.exists() else shutil.which("se-inject")
    if exe is None:
        sys.exit("se-inject is not installed (pip install -e .)")
    work = Path(tempfile.mkdtemp())
    out = work / "out"

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    rows = []
    typer_floor = [sys.executable, "-c", "import typer"]
    for label, tool in (("--help", [exe, "--help"]), ("--version", [exe, "--version"]),
                        ("recipes", [exe, "recipes"])):
        f, t, r = paired(typer_floor, tool, args.repeats * 2)
        rows.append((f"se-inject {label}", "import typer", f, t, statistics.median(r), 1.5))
    refusals = []
    existing = work / "existing"
    existing.mkdir()
    (existing / "model.safetensors").write_bytes(b"")
    for label, args_, code in (("resnet50 -o EXISTING", ["-o", str(existing)], 1),
                               ("resnet50 -o FILE", ["-o", str(existing / "model.safetensors")], 1),
                               ("resnet50 --export tflite", ["--export", "tflite"], 2)):
        f, t, r = paired(typer_floor, [exe, "resnet50", *args_], args.repeats * 2, expect=code)
        refusals.append((f"se-inject {label}", "import typer", f, t, statistics.median(r)))
    floor = [sys.executable, "-c", FLOOR, str(out)]
    tool = [exe, "resnet50", "-r", "16", "-o", str(out), "--force", "--seed", "0"]
    f, t, r = paired(floor, tool, args.repeats, setup=clean)
    rows.append(("se-inject resnet50 -r 16 -o DIR", "timm build + save", f, t, statistics.median(r), 1.25))
    shutil.rmtree(work, ignore_errors=True)

    print(f"{'command':34} {'floor':18} {'floor s':>8} {'tool s':>8} {'ratio':>6} {'target':>7}")
    for name, floor_name, f, t, ratio, target in rows:
        ok = "ok" if ratio <= target else "MISS"
        print(f"{name:34} {floor_name:18} {f:8.3f} {t:8.3f} {ratio:6.2f} {'<=' + str(target):>7} {ok}")
    for name, floor_name, f, t, ratio in refusals:
        print(f"{name:34} {floor_name:18} {f:8.3f} {t:8.3f} {ratio:6.2f} {'<1s':>7} {'ok' if t < 1 else 'MISS'}")


if __name__ == "__main__":
    main()
