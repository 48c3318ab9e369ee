"""A small mutation pass over se-inject's core: one-line mutants, one at a time, each run against the fast tests
that cover its module; a mutant the tests do not fail is a survivor.

Usage (from the repository root; imports no torch itself, its pytest runs do):

    python benchmarks/mutation_pass.py                      # every module, at most 60 mutants in all
    python benchmarks/mutation_pass.py --modules verify,coverage --limit 20 --timeout 180
    python benchmarks/mutation_pass.py --list               # the sampled mutants, without running them

The mutants: comparison flips (``==``/``!=``, ``<``/``<=``/``>``/``>=``, ``!=`` -> ``<``), ``any``/``all``,
``and``/``or``, a dropped ``not``, ``True``/``False``, an ``if`` condition replaced by ``False`` (the check never
fires), an operand of ``and``/``or`` dropped, a number changed (integers + 1, floats x 10), plus the named mutants of
issue 28 in `NAMED`. Mutants are drawn from the tokens of code (never strings or comments), named ones first, then
a seeded sample. Each runs on a copy of the tree (no bytecode caches, so a same-size edit is never hidden by a stale
.pyc) with ``pytest -n 0 -x`` and a timeout; a failure, an error or a timeout kills it.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module name: (source file, the fast test files that cover it)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "verify": ("se_inject/engine/verify.py",
               ("tests/test_verify_exactness.py", "tests/test_verify_refusals.py", "tests/test_verify.py")),
    "coverage": ("se_inject/engine/coverage.py", ("tests/test_engine_exactness.py", "tests/test_mutants.py")),
    "checkpoint": ("se_inject/io/checkpoint.py",
                   ("tests/test_mutants.py", "tests/test_checkpoint.py", "tests/test_security.py")),
    "counting": ("se_inject/engine/measure.py", ("tests/test_mutants.py", "tests/test_measure.py")),
    "keys": ("se_inject/engine/keys.py", ("tests/test_engine_exactness.py",)),
    "se-layer": ("se_inject/layers/squeeze_excite.py", ("tests/test_mutants.py", "tests/test_squeeze_excite.py")),
}

# The mutants issue 28 names, as (module, text, replacement): run first wherever the text is found.
NAMED: tuple[tuple[str, str, str], ...] = (
    ("verify", '(("output", 0), ("inputs after the call", 1))', '(("output", 0),)'),  # in-place effects not compared
    ("verify", "if torch.equal(got, expected):", "if torch.allclose(got, expected, equal_nan=True):"),  # a tolerance
    ("coverage", "if got != expected:", "if got < expected:"),  # a module that runs twice passes
    ("coverage", "if not all(any(t is m for m in made) for t in taken):",
     "if not any(any(t is m for m in made) for t in taken):"),  # the anchor check: any instead of all
    ("checkpoint", "if metadata.get(PLAN_HASH_KEY) != hashlib.sha256(text.encode()).hexdigest():",
     "if False:"),  # the plan checksum not compared
)

FLIPS = {"==": ["!="], "!=": ["==", "<"], "<": ["<=", "!="], "<=": ["<"], ">": [">="], ">=": [">"]}
WORDS = {"any": "all", "all": "any", "and": "or", "or": "and", "True": "False", "False": "True"}


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int  # 1-based
    original: str  # the source line
    mutated: str
    what: str

    def describe(self) -> str:
        return f"L{self.line}: {self.what}"


def _replace(line: str, start: int, end: int, new: str) -> str:
    return line[:start] + new + line[end:]


def mutants_of(module: str, source: str) -> list[Mutant]:
    """Every generic one-line mutant of `source`'s code tokens, plus the named ones."""
    lines = source.splitlines(keepends=True)
    found: list[Mutant] = []

    def add(row: int, new_line: str, what: str) -> None:
        if new_line != lines[row - 1]:
            found.append(Mutant(module, row, lines[row - 1], new_line, what))

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        (row, col), (end_row, end_col) = tok.start, tok.end
        if row != end_row or row > len(lines):
            continue
        line = lines[row - 1]
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        prev = tokens[i - 1].string if i else ""
        if tok.type == tokenize.OP and tok.string in FLIPS:
            for new in FLIPS[tok.string]:
                add(row, _replace(line, col, end_col, new), f"{tok.string} -> {new}")
        elif tok.type == tokenize.NAME and tok.string in WORDS and (tok.string not in ("any", "all") or nxt == "("):
            add(row, _replace(line, col, end_col, WORDS[tok.string]), f"{tok.string} -> {WORDS[tok.string]}")
        elif tok.type == tokenize.NAME and tok.string == "not" and prev != "is" and nxt != "in":
            add(row, _replace(line, col, end_col + 1, ""), "not dropped")
        elif tok.type == tokenize.NUMBER and not tok.string.startswith("0x"):
            try:
                value = int(tok.string)
                new = str(value + 1)
            except ValueError:
                try:
                    new = repr(float(tok.string) * 10)
                except ValueError:
                    continue
            add(row, _replace(line, col, end_col, new), f"{tok.string} -> {new}")
        elif (tok.type == tokenize.NAME and tok.string in ("if", "elif") and not line[:col].strip()
              and line.rstrip("\n").endswith(":")):  # a one-line condition: the check never fires
            add(row, line[:col] + f"{tok.string} False:\n", "if condition -> False")
        if tok.type == tokenize.NAME and tok.string in ("and", "or"):
            # drop the right operand: up to the next and/or/closing bracket/colon at the same depth, on this line
            depth, j = 0, i + 1
            while j < len(tokens) and tokens[j].start[0] == row:
                s = tokens[j].string
                if s in "([{":
                    depth += 1
                elif s in ")]}":
                    if depth == 0:
                        break
                    depth -= 1
                elif depth == 0 and (s in ("and", "or", ":", ",") or tokens[j].type in (
                        tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT)):
                    break
                j += 1
            if j > i + 1 and tokens[j - 1].end[0] == row:
                cut_start = tokens[i - 1].end[1]
                add(row, line[:cut_start] + line[tokens[j - 1].end[1]:], f"operand after {tok.string} dropped")
    for name, text, new in NAMED:
        if name != module:
            continue
        for row, line in enumerate(lines, 1):
            if text in line:
                found.insert(0, Mutant(module, row, line, line.replace(text, new), f"named: {text} -> {new}"))
    unique: dict[tuple[int, str], Mutant] = {}
    for m in found:
        unique.setdefault((m.line, m.mutated), m)
    return list(unique.values())


def _docstring_lines(source: str) -> set[int]:
    import ast

    skip: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    return skip


def sample(module: str, source: str, limit: int, seed: int) -> list[Mutant]:
    """The named mutants, then a seeded sample of the rest, at most `limit` in all."""
    skip = _docstring_lines(source)
    every = [m for m in mutants_of(module, source) if m.line not in skip]
    named = [m for m in every if m.what.startswith("named")]
    rest = [m for m in every if not m.what.startswith("named")]
    random.Random(f"{seed}:{module}").shuffle(rest)
    return (named + rest)[:limit] if limit > len(named) else named[:limit]


def _copy_tree(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in ("se_inject", "tests", "recipes", "benchmarks", "docs"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, into / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, into / name)


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: float, log: list[str] | None = None) -> str:
    """'pass', 'fail' or 'timeout' (the output's tail appended to `log`)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
               "-p", "no:randomly", *[t for t in tests if (tree / t).exists()]]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout"
    if log is not None:
        log.append((done.stdout + done.stderr).decode(errors="replace")[-3000:])
    return "pass" if done.returncode == 0 else "fail"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    parser.add_argument("--limit", type=int, default=60, help="mutants in all, shared among the modules")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per test run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the sampled mutants and exit")
    parser.add_argument("--without", default="", help="comma-separated test files to leave out (a 'before' run)")
    args = parser.parse_args(argv)
    modules = [m for m in args.modules.split(",") if m]
    without = {t for t in args.without.split(",") if t}
    unknown = set(modules) - set(TARGETS)
    if unknown:
        parser.error(f"unknown module(s): {', '.join(sorted(unknown))}")
    per_module = [args.limit // len(modules) + (i < args.limit % len(modules)) for i in range(len(modules))]
    chosen = {m: sample(m, (ROOT / TARGETS[m][0]).read_text(), n, args.seed)
              for m, n in zip(modules, per_module, strict=True)}
    if args.list:
        for module, mutants in chosen.items():
            for m in mutants:
                print(f"{module} {m.describe()}\n    - {m.original.strip()}\n    + {m.mutated.strip()}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="se-inject-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        for module, mutants in chosen.items():
            path, tests = TARGETS[module]
            tests = tuple(t for t in tests if t not in without)
            target = tree / path
            original = target.read_text()
            start = time.monotonic()
            log: list[str] = []
            baseline = _run_tests(tree, tests, args.timeout, log)
            if baseline != "pass":
                print(f"{module}: the tests {baseline} without a mutant; skipped\n{''.join(log)}", file=sys.stderr)
                rows.append((module, len(mutants), None, []))
                continue
            survivors, killed = [], 0
            lines = original.splitlines(keepends=True)
            for m in mutants:
                mutated = lines.copy()
                mutated[m.line - 1] = m.mutated
                target.write_text("".join(mutated))
                try:
                    outcome = _run_tests(tree, tests, args.timeout)
                finally:
                    target.write_text(original)
                if outcome == "pass":
                    survivors.append(m)
                else:
                    killed += 1
                print(f"  {module} {m.describe()}: {'survived' if outcome == 'pass' else 'killed'}"
                      f"{' (timeout)' if outcome == 'timeout' else ''}", file=sys.stderr, flush=True)
            print(f"{module}: {len(mutants)} mutants in {time.monotonic() - start:.0f} s", file=sys.stderr)
            rows.append((module, len(mutants), killed, survivors))
    print("| module | mutants | killed | survivors |")
    print("|---|---|---|---|")
    for module, count, killed, survivors in rows:
        listed = "; ".join(f"`{m.describe()}` ({m.mutated.strip()[:70]})" for m in survivors) or "none"
        print(f"| {module} | {count} | {'tests fail unmutated' if killed is None else killed} | {listed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
