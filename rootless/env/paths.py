"""Where rbuild keeps its store and runtime state (the issue's precedence rules)."""

from __future__ import annotations

import contextlib
import glob
import os
import stat
import tempfile

from rootless.errors import RbuildError


def store_root(cli_root: str | None) -> str:
    """--root > RBUILD_ROOT > $XDG_DATA_HOME/rbuild > ~/.local/share/rbuild; /var/lib/rbuild for root of
    the initial user namespace (uid 0 in another namespace, as in `rbuild unshare`, is a user like others)."""
    if cli_root:
        return os.path.abspath(cli_root)
    env = os.environ.get("RBUILD_ROOT")
    if env:
        return os.path.abspath(env)
    if os.getuid() == 0 and _initial_namespace():
        return "/var/lib/rbuild"
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return os.path.join(xdg, "rbuild")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "rbuild")


def _initial_namespace() -> bool:
    from rootless.env import userns

    return userns.initial_namespace()


def _unsafe(path: str, uid: int) -> str | None:
    """Why `path` cannot be our private runtime directory, or None when it can.

    Never followed: a symlink, another user's directory or one others may write into could let them
    place our mount points (or plant entries in them).
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def runtime_dir(store: str | None = None) -> tuple[str, str | None]:
    """$XDG_RUNTIME_DIR/rbuild, else /tmp/rbuild-$UID: a 0700 directory of ours; plus a notice if it was not.

    In /tmp anyone can take that name first. Then a private `NAME-XXXXXXXX` next to it is used instead
    (found again by name and ownership on later runs), so another user can never block or redirect builds.
    uid 0 of a nested user namespace (rbuild in `rbuild unshare`, in a rootless container) shares the name
    /tmp/rbuild-0 with every other such namespace and with real root: it uses `run/` in the store `store`.
    """
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        path = os.path.join(xdg, "rbuild")
    elif uid == 0 and store is not None and not _initial_namespace():
        path = os.path.join(store, "run")
        with contextlib.suppress(OSError):
            os.makedirs(store, 0o700, exist_ok=True)
    else:
        path = f"/tmp/rbuild-{uid}"
    try:
        os.makedirs(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise RbuildError(f"cannot create runtime directory {path}: {e.strerror}") from None
    try:
        why = _unsafe(path, uid)
    except OSError as e:
        raise RbuildError(f"cannot use runtime directory {path}: {e.strerror}") from None
    if why is None:
        return path, None
    for cand in sorted(glob.glob(glob.escape(path) + "-*")):
        try:
            if _unsafe(cand, uid) is None:
                return cand, f"rbuild: {path} {why}: using {cand} instead (remove {path} to stop this)"
        except OSError:
            continue
    try:
        fresh = tempfile.mkdtemp(prefix=os.path.basename(path) + "-", dir=os.path.dirname(path))
    except OSError as e:
        raise RbuildError(
            f"runtime directory {path} {why}, and no private one can be made next to it: {e.strerror}"
        ) from None
    return fresh, f"rbuild: {path} {why}: using {fresh} instead (remove {path} to stop this)"
