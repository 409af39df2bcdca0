"""Build step for the optional FUSE overlay helper (csrc/): compiled when pkg-config finds libfuse3.

Without libfuse3 (or without make/gcc) the install still succeeds, only without the helper; the
kernel-overlay and copy strategies do not need it.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HELPER = "rbuild-fuse-overlay"


def _fuse3_available() -> bool:
    if not (shutil.which("pkg-config") and shutil.which("make") and (shutil.which("gcc") or shutil.which("cc"))):
        return False
    return subprocess.run(["pkg-config", "--exists", "fuse3"], check=False).returncode == 0


class BuildWithHelper(build_py):
    """build_py, then csrc/ into rootless/libexec/ of the build tree (so it is installed as package data)."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        csrc = os.path.join(here, "csrc")
        if not os.path.isdir(csrc):
            return
        if not _fuse3_available():
            print(f"rbuild: libfuse3 development files not found (pkg-config fuse3); {HELPER} is not built")
            return
        out_dir = os.path.join(os.path.abspath(self.build_lib), "rootless", "libexec")
        os.makedirs(out_dir, exist_ok=True)
        out = os.path.join(out_dir, HELPER)
        subprocess.run(["make", "-s", "-B", "-C", csrc, f"OUT={out}"], check=True)
        os.chmod(out, 0o755)


setup(cmdclass={"build_py": BuildWithHelper})
