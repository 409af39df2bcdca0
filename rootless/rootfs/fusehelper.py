"""Where the FUSE overlay helper (csrc/, built by `pip install .` when libfuse3 is present) is installed."""

from __future__ import annotations

import os

HELPER_NAME = "rbuild-fuse-overlay"


def helper_path() -> str | None:
    """The installed rbuild-fuse-overlay, or None when the install was built without libfuse3."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libexec", HELPER_NAME)
    return path if os.access(path, os.X_OK) else None
