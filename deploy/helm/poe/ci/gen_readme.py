#!/usr/bin/env python3
"""Writes the values table of the chart's README.md from the comments in values.yaml.

    python deploy/helm/poe/ci/gen_readme.py            # rewrite the table in README.md
    python deploy/helm/poe/ci/gen_readme.py --check    # exit 1 when README.md is out of date

A key is documented by the comment lines right above it; from a line starting with `# --` on when
there is one (so a section's introduction above it stays out), else the whole comment. Every
documented key becomes a row: its dotted path, type, default (JSON, empty for a mapping whose keys
have rows of their own) and description. The table sits between the START and END markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent
START = "<!-- values table: generated from values.yaml by ci/gen_readme.py; do not edit by hand -->"
END = "<!-- end of values table -->"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):")


def documented_keys(values_text: str) -> list[tuple[list[str], str]]:
    """(path, description) of every key with a comment right above it, in file order."""
    lines = values_text.splitlines()
    stack: list[tuple[int, str]] = []
    found = []
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip())
            j -= 1
        if not comment:
            continue
        marked = [k for k, c in enumerate(comment) if c.startswith("# --")]
        if marked:
            comment = comment[marked[0]:]
        text = " ".join(re.sub(r"^#\s?(--\s*)?", "", c).strip() for c in comment)
        found.append(([k for _, k in stack], text.strip()))
    return found


def _lookup(values: dict, path: list[str]):
    node = values
    for key in path:
        node = node[key]
    return node


def _type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else "null"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    keys = documented_keys(values_text)
    parents = {tuple(path[:n]) for path, _ in keys for n in range(1, len(path))}
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for path, description in keys:
        value = _lookup(values, path)
        shown = "" if tuple(path) in parents and isinstance(value, dict) else \
            f"`{_cell(json.dumps(value, ensure_ascii=False, separators=(', ', ': ')))}`"
        rows.append(f"| `{'.'.join(path)}` | {_type(value)} | {shown} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def updated_readme(readme_text: str, table: str) -> str:
    if readme_text.count(START) != 1 or readme_text.count(END) != 1:
        raise ValueError(f"README.md must hold the markers {START!r} and {END!r} once each")
    head, rest = readme_text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is out of date")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory (default: this chart)")
    args = parser.parse_args(argv)
    readme = args.chart / "README.md"
    try:
        current = readme.read_text()
        wanted = updated_readme(current, render_table((args.chart / "values.yaml").read_text()))
    except (OSError, ValueError, KeyError, yaml.YAMLError) as e:
        print(f"gen_readme: {e}", file=sys.stderr)
        return 1
    if wanted == current:
        return 0
    if args.check:
        print(f"gen_readme: {readme} is out of date; run python deploy/helm/poe/ci/gen_readme.py", file=sys.stderr)
        return 1
    readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
