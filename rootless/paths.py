"""Where rbuild keeps its store and runtime state (the issue's precedence rules)."""

from __future__ import annotations

import os
import stat

from rootless.errors import RbuildError


def store_root(cli_root: str | None) -> str:
    """--root > RBUILD_ROOT > $XDG_DATA_HOME/rbuild > ~/.local/share/rbuild; /var/lib/rbuild for real root."""
    if cli_root:
        return os.path.abspath(cli_root)
    env = os.environ.get("RBUILD_ROOT")
    if env:
        return os.path.abspath(env)
    if os.getuid() == 0:
        return "/var/lib/rbuild"
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return os.path.join(xdg, "rbuild")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "rbuild")


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/rbuild, else /tmp/rbuild-$UID, created 0700 and checked to be ours."""
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(xdg, "rbuild") if xdg else f"/tmp/rbuild-{uid}"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise RbuildError(f"cannot create runtime directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise RbuildError(f"runtime directory {path} is not a directory owned by uid {uid}; remove it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path
