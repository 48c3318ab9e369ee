"""Rewrite ``inject(model, reduction=8, gate="...", recipe=..., recipe_files=[...], images=...)`` calls to the
settings-record API: ``inject(model, Settings(rd_ratio=1 / 8, gate_layer="..."), recipes=[...], drift=...)``.

Usage: python3 .ci/migrate_inject_calls.py FILE.py ...  (rewrites in place; prints what it could not rewrite:
calls spreading ``**options``, which need a hand edit). Run ``ruff check --fix`` afterwards for the imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

OPTIONS = {"attention": "attn_layer", "reduction": "rd_ratio", "divisor": "rd_divisor", "gate": "gate_layer",
           "bias": "bias", "init": "init", "include": "include", "exclude": "exclude", "min_channels": "min_channels",
           "fill": "fill", "placement": "placement"}
MOVED = {"recipe", "recipe_files", "images", *OPTIONS}


def _segment(text: str, node: ast.AST) -> str:
    return ast.get_source_segment(text, node) or ""


def _rewrite(text: str, call: ast.Call) -> str | None:
    kws = {k.arg: k for k in call.keywords if k.arg is not None}
    if not MOVED & set(kws):
        return None
    func = _segment(text, call.func)
    parts = [_segment(text, a) for a in call.args]
    settings = []
    for k in call.keywords:
        if k.arg in OPTIONS:
            value = _segment(text, k.value)
            if k.arg == "reduction":
                value = f"1 / {value}" if isinstance(k.value, (ast.Name, ast.Constant)) else f"1 / ({value})"
            settings.append(f"{OPTIONS[k.arg]}={value}")
    if settings:
        if len(call.args) != 1:
            return None  # settings already passed positionally
        prefix = "se_inject." if func.startswith("se_inject.") else ""
        parts.append(f"{prefix}Settings({', '.join(settings)})")
    for k in call.keywords:
        if k.arg is None:
            parts.append(f"**{_segment(text, k.value)}")
        elif k.arg == "recipe" or (k.arg == "recipe_files" and "recipe" not in kws):
            items = []
            for key in ("recipe", "recipe_files"):
                node = kws[key].value if key in kws else None
                if isinstance(node, (ast.List, ast.Tuple)):
                    items += [_segment(text, e) for e in node.elts]
                elif node is not None:
                    items.append(_segment(text, node) if key == "recipe" else f"*{_segment(text, node)}")
            if len(kws.keys() & {"recipe", "recipe_files"}) == 1 and not items[0].startswith("*") and (
                    not isinstance(kws.get("recipe_files", kws.get("recipe")).value, (ast.List, ast.Tuple))):
                parts.append(f"recipes={items[0]}")
            else:
                parts.append(f"recipes=[{', '.join(items)}]")
        elif k.arg == "images":
            parts.append(f"drift={_segment(text, k.value)}")
        elif k.arg not in MOVED:
            parts.append(f"{k.arg}={_segment(text, k.value)}")
    return f"{func}({', '.join(parts)})"


def _wrap(line_start: str, call: str, limit: int = 120) -> str:
    """`call` placed after `line_start`, wrapped at commas between arguments to fit `limit`."""
    if len(line_start) + len(call) <= limit:
        return call
    indent = " " * (len(line_start) + call.index("(") + 1)
    head, args = call[: call.index("(") + 1], call[call.index("(") + 1: -1]
    pieces, depth, current, quote = [], 0, "", ""
    for ch in args:
        if quote:
            quote = "" if ch == quote and not current.endswith("\\") else quote
        elif ch in "'\"":
            quote = ch
        else:
            depth += ch in "([{"
            depth -= ch in ")]}"
        if ch == "," and depth == 0 and not quote:
            pieces.append(current.strip())
            current = ""
        else:
            current += ch
    pieces.append(current.strip())
    lines, line = [], line_start + head
    for i, piece in enumerate(pieces):
        piece += "," if i < len(pieces) - 1 else ")"
        candidate = line + ("" if line.endswith("(") else " ") + piece
        if len(candidate) > limit and not line.endswith("("):
            lines.append(line)
            line = indent + piece
        else:
            line = candidate
    lines.append(line)
    return "\n".join(lines)[len(line_start):]


def migrate(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Name) and n.func.id == "inject")
        or (isinstance(n.func, ast.Attribute) and n.func.attr == "inject"))]
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    problems = []
    for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset), reverse=True):
        if any(k.arg is None for k in call.keywords):
            problems.append(f"{path}:{call.lineno}: spreads **options")
        new = _rewrite(text, call)
        if new is None:
            continue
        start = offsets[call.lineno - 1] + call.col_offset
        end = offsets[call.end_lineno - 1] + call.end_col_offset
        line_start = text[offsets[call.lineno - 1]:start]
        text = text[:start] + _wrap(line_start, new) + text[end:]
    if "Settings(" in text and "se_inject.Settings(" not in text.replace("se_inject.Settings(", "", 0) and (
            "\nfrom se_inject import Settings" not in text and "from se_inject.settings import" not in text):
        bare = any(line.lstrip().startswith("Settings(") or " Settings(" in line or "(Settings(" in line
                   for line in text.splitlines())
        if bare:
            marker = "\nimport se_inject\n"
            marker = marker if marker in text else "\nfrom __future__ import annotations\n"
            text = text.replace(marker, marker + "from se_inject import Settings\n", 1)
    Path(path).write_text(text, encoding="utf-8")
    return problems


if __name__ == "__main__":
    for p in sys.argv[1:]:
        for problem in migrate(p):
            print(problem)
