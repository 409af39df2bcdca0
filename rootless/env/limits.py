"""Per-user limits on a shared build host: a store size (with a prune policy) and concurrent builds.

An administrator sets them in /etc/rbuild/rbuild.toml (RBUILD_CONFIG names another file):

    [limits]
    store_size = "20G"          # after each build, prune the store down to this
    concurrent_builds = 2       # further builds of the same user wait for a free slot
    [limits.users.alice]
    store_size = "50G"

RBUILD_STORE_SIZE and RBUILD_CONCURRENT_BUILDS may only lower them. rbuild runs as the user, so these
limits are cooperative: a user who runs another program can exceed them. Hard limits need the kernel's:
filesystem quotas for the store, a systemd slice or cgroup for processes and memory.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from rootless.errors import RbuildError

CONFIG = "/etc/rbuild/rbuild.toml"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Limits:
    store_size: int | None = None  # bytes
    concurrent_builds: int | None = None


def parse_size(text: object, where: str) -> int:
    """`20G`, `512M`, `1000000` (bytes; K, M, G, T are powers of 1024, a trailing B or iB is allowed)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] else ""
    number = s[: len(s) - len(unit)].strip()
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise RbuildError(f"{where}: {text!r} is not a size (like 20G)") from None
    if value <= 0:
        raise RbuildError(f"{where}: {text!r} must be more than 0")
    return int(value)


def _count(text: object, where: str) -> int:
    try:
        n = int(str(text))
    except ValueError:
        raise RbuildError(f"{where}: {text!r} is not a number") from None
    if n < 1:
        raise RbuildError(f"{where}: {text!r} must be at least 1")
    return n


def _lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def load() -> Limits:
    """The limits for the current user: the config file's, lowered by the environment's."""
    path = os.environ.get("RBUILD_CONFIG", CONFIG)
    size = count = None
    try:
        with open(path, "rb") as f:
            import tomllib

            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise RbuildError(f"{path}: {e}") from None
    except FileNotFoundError:
        data = {}
    except OSError as e:
        raise RbuildError(f"cannot read {path}: {e.strerror}") from None
    section = data.get("limits", {})
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    for table, where in (
        (section, f"{path} [limits]"),
        (section.get("users", {}).get(user, {}), f"{path} [limits.users.{user}]"),
    ):
        if "store_size" in table:
            size = parse_size(table["store_size"], f"{where} store_size")
        if "concurrent_builds" in table:
            count = _count(table["concurrent_builds"], f"{where} concurrent_builds")
    if os.environ.get("RBUILD_STORE_SIZE"):
        size = _lower(size, parse_size(os.environ["RBUILD_STORE_SIZE"], "RBUILD_STORE_SIZE"))
    if os.environ.get("RBUILD_CONCURRENT_BUILDS"):
        count = _lower(count, _count(os.environ["RBUILD_CONCURRENT_BUILDS"], "RBUILD_CONCURRENT_BUILDS"))
    return Limits(size, count)
