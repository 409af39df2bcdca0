"""Run a python script with this checkout's `rootless` as a test user, inside rbuild's user namespace."""

from __future__ import annotations

import os
import shutil
from typing import Any

ROOTLESS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rootless")


def in_userns(runner: Any, script: str, *args: str, single: bool, env: dict[str, str] | None = None) -> str:
    """stdout of `script` run by `runner`'s user via `rbuild unshare` (a subuid or single-uid map).

    The package is copied next to the script: the checkout may not be readable by the test user.
    """
    work = runner.mkdir()
    pkg = os.path.join(work, "pkg")
    shutil.copytree(ROOTLESS, os.path.join(pkg, "rootless"), ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(work, "script.py")
    with open(path, "w") as f:
        f.write(script)
    runner.own(work)
    res = runner.run(
        "unshare",
        "/usr/bin/python3",
        path,
        *args,
        env={"PYTHONPATH": pkg, "SINGLE": "1" if single else "0", **(env or {})},
    )
    return res.stdout
