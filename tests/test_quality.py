"""Quality gates, run with the suite so CI enforces them: lint, formatting, strict types, import rules.

The tools come from the test venv (the `test` extras in pyproject.toml) and read their configuration
from pyproject.toml; each runs on the checkout (the repository root), not on the installed copy.
"""

from __future__ import annotations

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
