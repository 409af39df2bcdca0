"""Runs `rbuild ARGS...` in this process (as the unprivileged user the test runs it as) and writes a report:
the exit status, how many times the command entered a user namespace (`userns.run_inside`, counted, still
real) and every module this process imported. Usage: python startup_harness.py REPORT ARGS..."""

from __future__ import annotations

import json
import sys
from typing import Any

from rootless.env import userns

entered: list[int] = []
_real = userns.run_inside


def _counting(*args: Any, **kwargs: Any) -> int:
    entered.append(1)
    return _real(*args, **kwargs)


userns.run_inside = _counting

from rootless.cli.main import main  # noqa: E402

code: object = 0
try:
    code = main(sys.argv[2:])
except SystemExit as e:  # --version and --help exit from argparse
    code = e.code
finally:
    sys.stdout.flush()
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "namespaces": len(entered), "modules": sorted(sys.modules)}, f)
sys.exit(code if isinstance(code, int) else 0)
