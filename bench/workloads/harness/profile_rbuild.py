"""Run `rbuild ARGS...` under cProfile, the forked user-namespace child included.

    python profile_rbuild.py OUT_PREFIX ARGS...

rbuild does its work in a child forked into the user namespace, which leaves through os._exit():
each process (the parent and every forked Python child) writes its own OUT_PREFIX.PID stats file,
the child's restarted at the fork so nothing is counted twice (a RUN sandbox's child, pivoted into
the image, cannot write its file: it is lost, it only prepares an exec). Only the main thread is profiled
(cProfile's limit): time spent in worker threads shows up as the main thread waiting for them.
"""

from __future__ import annotations

import cProfile
import os
import sys


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    prof = cProfile.Profile()
    real_exit = os._exit

    def dump() -> None:
        prof.disable()
        try:  # a sandbox child has pivoted into the image: its stats are lost, the build must go on
            prof.dump_stats(f"{out}.{os.getpid()}")
        except Exception:  # noqa: BLE001
            pass

    def restart() -> None:
        prof.disable()
        prof.clear()
        prof.enable()

    def exit_(code: int) -> None:
        dump()
        real_exit(code)

    os._exit = exit_  # type: ignore[assignment]
    os.register_at_fork(after_in_child=restart)
    from rootless.cli.main import main as rbuild_main

    prof.enable()
    try:
        code = rbuild_main(argv)
    finally:
        dump()
    return code


if __name__ == "__main__":
    sys.exit(main())
