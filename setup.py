"""Build step for the optional C helpers (csrc/): the FUSE overlay, compiled when pkg-config finds
libfuse3, and the single-uid supervisor's front (rbuild-notify), compiled when make and a C compiler exist.

Without them the install still succeeds, only without the helper: the kernel-overlay and copy strategies
do not need the FUSE one, and the Python supervisor answers every call without rbuild-notify.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HELPER = "rbuild-fuse-overlay"
NOTIFY = "rbuild-notify"


def _compiler() -> bool:
    return bool(shutil.which("make") and (shutil.which("gcc") or shutil.which("cc")))


def _fuse3_available() -> bool:
    if not (shutil.which("pkg-config") and _compiler()):
        return False
    return subprocess.run(["pkg-config", "--exists", "fuse3"], check=False).returncode == 0


class BuildWithHelper(build_py):
    """build_py, then csrc/ into rootless/libexec/ of the build tree (so they are installed as package data)."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        csrc = os.path.join(here, "csrc")
        if not os.path.isdir(csrc):
            return
        out_dir = os.path.join(os.path.abspath(self.build_lib), "rootless", "libexec")
        os.makedirs(out_dir, exist_ok=True)
        if not _compiler():
            print(f"rbuild: no make or C compiler; {NOTIFY} and {HELPER} are not built")
            return
        notify = os.path.join(out_dir, NOTIFY)
        made = subprocess.run(["make", "-s", "-B", "-C", csrc, "notify", f"NOTIFY_OUT={notify}"], check=False)
        if made.returncode == 0:
            os.chmod(notify, 0o755)
        else:  # optional: the Python supervisor answers every call without it
            print(f"rbuild: {NOTIFY} did not compile; single-uid RUNs use the Python supervisor alone")
        if not _fuse3_available():
            print(f"rbuild: libfuse3 development files not found (pkg-config fuse3); {HELPER} is not built")
            return
        out = os.path.join(out_dir, HELPER)
        subprocess.run(["make", "-s", "-B", "-C", csrc, f"OUT={out}"], check=True)
        os.chmod(out, 0o755)


setup(cmdclass={"build_py": BuildWithHelper})
