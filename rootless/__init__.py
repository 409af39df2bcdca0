"""rbuild: a rootless, daemonless OCI image builder.

`import rootless` stays light: build, pull, push, images, inspect, tag, rmi and Image come from
rootless.api on first use (docs/api.md); errors are rootless.errors, events rootless.events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "build", "pull", "push", "images", "inspect", "tag", "rmi", "Image"]
_API = frozenset(__all__[1:])

if TYPE_CHECKING:
    from rootless.api import Image, build, images, inspect, pull, push, rmi, tag


def __getattr__(name: str) -> Any:
    """The library functions, imported when first asked for (the command line never pays for them)."""
    if name in _API:
        from rootless import api

        return getattr(api, name)
    raise AttributeError(f"module 'rootless' has no attribute {name!r}")
