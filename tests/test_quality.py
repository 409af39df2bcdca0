"""Quality gates, run with the suite so CI enforces them: lint, formatting, strict types, import rules.

The tools come from the test venv (the `test` extras in pyproject.toml) and read their configuration
from pyproject.toml; each runs on the checkout (the repository root), not on the installed copy.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "rootless", "tests"],
        ["ruff", "format", "--check", "rootless", "tests"],
        ["mypy"],
        ["lint-imports", "--no-cache"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict", "import-contracts"],
)
def test_gate(argv: list[str]) -> None:
    exe = os.path.join(BIN, argv[0])
    if not os.path.exists(exe):
        pytest.fail(f"{argv[0]} is not installed next to {sys.executable} (pip install '.[test]')")
    env = {**os.environ, "PYTHONPATH": ROOT, "MYPY_CACHE_DIR": os.devnull, "RUFF_NO_CACHE": "true"}
    res = subprocess.run([exe, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"


# Nothing below the command line prints: events go to a reporter (rootless/events.py). runinit is a program
# of its own (it runs in a fresh interpreter for every RUN), so its error line is its business.
OUTPUT_ALLOWED = ("rootless/cli/", "rootless/sandbox/runinit.py")


def output_uses(source: str) -> list[int]:
    """Lines where a module prints or touches sys.stdout/sys.stderr other than to flush them (before a fork)."""
    tree = ast.parse(source)
    flushed = {
        id(node.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "flush"
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "print":
            found.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__")
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            and id(node) not in flushed
        ):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            if any(a.name in ("stdout", "stderr", "__stdout__", "__stderr__") for a in node.names):
                found.append(node.lineno)
    return sorted(found)


def test_output_check_sees_prints_and_writes() -> None:
    src = "import sys\nprint('x')\nsys.stderr.write('y')\nsys.stdout.flush()\nlog = print\nx = sys.stdout\n"
    assert output_uses(src) == [2, 3, 5, 6]
    assert output_uses("from sys import stderr\n") == [1]


def test_nothing_below_the_cli_prints() -> None:
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "rootless")):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            if not name.endswith(".py") or rel.startswith(OUTPUT_ALLOWED):
                continue
            with open(path, encoding="utf-8") as f:
                offenders += [f"{rel}:{line}" for line in output_uses(f.read())]
    assert not offenders, "print or sys.stdout/sys.stderr below the command line (emit an event): " + ", ".join(
        offenders
    )
