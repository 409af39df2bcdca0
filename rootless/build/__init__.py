"""The build: planner, step loop and instruction handlers, COPY/ADD sources, the step cache.

`rootless.build` is also the API's build function (docs/api.md): once this subpackage is imported it is
the attribute `build` of `rootless`, so the package itself may be called, and calls rootless.api.build.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _BuildPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> str:
        from rootless.api import build

        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _BuildPackage
