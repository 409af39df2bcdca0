"""Where the single-uid supervisor's C front (csrc/notify/, built by `pip install .`) is installed."""

from __future__ import annotations

import os

HELPER_NAME = "rbuild-notify"


def helper_path() -> str | None:
    """The rbuild-notify to use, None when there is none (the Python supervisor answers every call then).

    RBUILD_NOTIFY_HELPER names another binary (a sanitizer build in the tests), or none: `none`.
    """
    path = os.environ.get("RBUILD_NOTIFY_HELPER") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libexec", HELPER_NAME
    )
    return path if os.path.isabs(path) and os.access(path, os.X_OK) else None
